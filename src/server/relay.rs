//! The relay of an HTTP/2 response body: a task owns the real body (its upstream stream and slot) and
//! hands its frames on through a one-frame channel. An HTTP/2 client that grants no window makes hyper
//! stop taking frames without the socket ever backing up — the connection's write-stall cut cannot see
//! it — so the relay does: a frame the client does not take within the stall limit ends the relay, which
//! drops the real body and gives its upstream slot back; the client's stream is reset.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::proxy::{Relay, ResponseBody};

/// Starts relaying `body`; returns the body hyper sends.
pub fn relay(body: ResponseBody, stall: Duration) -> ResponseBody {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut body = body;
        loop {
            let next = match body.frame().await {
                Some(frame) => Relay::Frame(frame),
                None if body.broke() => Relay::Broken,
                None => Relay::End,
            };
            let end = matches!(next, Relay::End | Relay::Broken);
            match tokio::time::timeout(stall, tx.send(next)).await {
                Ok(Ok(())) if !end => {}
                Ok(Ok(())) => return,
                Ok(Err(_)) => return, // the client's stream is gone
                Err(_) => {
                    tracing::warn!(stall = %humantime::format_duration(stall), "an HTTP/2 client took no data; its stream is cut");
                    return;
                }
            }
        }
    });
    ResponseBody::relayed(rx)
}
