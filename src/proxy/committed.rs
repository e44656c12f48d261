//! A non-streaming response committed early: DeepSeek sent blank lines while it queued the request, and
//! they went to the client as they came (its status and headers with them, `deliver.rs`). What follows
//! is still held until complete, so a body cut now is redone rather than delivered short: the request is
//! sent again, and the redone answer's JSON becomes the body — or, when the redo cannot end in a 200,
//! sluice's own JSON error does (the status is already out). The relay runs in its own task and feeds the
//! client's body (`Relay`).

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::attempts::Progress;
use super::deliver::MAX_HELD;
use super::resume::Continuation;
use super::{Proxy, Relay, ResponseBody};
use crate::error::{error_json, ProxyError};

/// Relays the rest of a committed JSON body: blank lines at once, the JSON when complete, a redo on a cut.
pub async fn relay(proxy: Arc<Proxy>, request: Continuation, mut body: ResponseBody, tx: mpsc::Sender<Relay>) {
    let mut held: Vec<u8> = Vec::new();
    let cut = loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return,
        };
        match frame {
            None => {
                send(&tx, Bytes::from(held)).await;
                let _ = tx.send(Relay::End).await;
                return;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                if held.is_empty() && data.iter().all(u8::is_ascii_whitespace) {
                    if !send(&tx, data).await {
                        return;
                    }
                } else {
                    held.extend_from_slice(&data);
                    if held.len() > MAX_HELD {
                        // Too large to hold: it flows on, and a cut aborts it.
                        let rest = std::mem::take(&mut held);
                        return pass_through(body, Bytes::from(rest), tx).await;
                    }
                }
            }
            Some(Err(cut)) => break cut,
        }
    };
    drop(body); // the broken attempt's slot goes back before the redo waits for one
    tracing::warn!(error = %cut, "a committed response was cut; sending the request again");
    let redone = tokio::select! {
        redone = redo(&proxy, &request) => redone,
        () = tx.closed() => return, // the client went away while the redo waited
    };
    let answer = match redone {
        Ok(json) => json,
        Err(err) => error_json(&format!("{err} (after the response was cut: {cut})"), err.kind()),
    };
    send(&tx, answer).await;
    let _ = tx.send(Relay::End).await;
}

/// The request sent again, its whole JSON answer — an error unless it is a complete 200.
async fn redo(proxy: &Proxy, request: &Continuation) -> Result<Bytes, ProxyError> {
    let mut progress = Progress::default();
    let generation = &request.generation;
    let sent = proxy
        .send_with_retries(generation, &request.outgoing, &request.seen, request.deadline, &mut progress, None)
        .await?;
    if sent.response.status() != StatusCode::OK {
        return Err(ProxyError::UpstreamUnreachable(format!(
            "the redone request was answered {}",
            sent.response.status()
        )));
    }
    let mut whole = sent.prefix.concat();
    if !sent.complete {
        // The rest, with the idle limit between frames (DeepSeek may send blank lines for a while).
        let idle = generation.config.upstream.idle_timeout;
        let cut = || ProxyError::UpstreamUnreachable("the redone request was cut too".into());
        let mut body = sent.response.into_body();
        loop {
            match tokio::time::timeout(idle, body.frame()).await.map_err(|_| cut())? {
                None => break,
                Some(Err(_)) => return Err(cut()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        whole.extend_from_slice(&data);
                    }
                    if whole.len() > 8 * MAX_HELD {
                        return Err(ProxyError::UpstreamUnreachable("the redone answer is too large to hold".into()));
                    }
                }
            }
        }
    }
    drop(sent.permit);
    let trimmed = whole.iter().position(|b| !b.is_ascii_whitespace()).map_or(&whole[..0], |at| &whole[at..]);
    Ok(Bytes::copy_from_slice(trimmed))
}

/// Forwards the rest of `body` as it comes (after `first`); a cut aborts the client's response.
async fn pass_through(mut body: ResponseBody, first: Bytes, tx: mpsc::Sender<Relay>) {
    if !send(&tx, first).await {
        return;
    }
    loop {
        match body.frame().await {
            None => {
                let _ = tx.send(Relay::End).await;
                return;
            }
            Some(Ok(frame)) => {
                if tx.send(Relay::Frame(Ok(frame))).await.is_err() {
                    return;
                }
            }
            Some(Err(cut)) => {
                let _ = tx.send(Relay::Frame(Err(cut))).await;
                return;
            }
        }
    }
}

/// Sends bytes to the client; false once it has gone.
async fn send(tx: &mpsc::Sender<Relay>, bytes: Bytes) -> bool {
    bytes.is_empty() || tx.send(Relay::Frame(Ok(Frame::data(bytes)))).await.is_ok()
}
