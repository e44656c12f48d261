//! Keep-alive while queued: a streaming request that has no response after `queue.stream_keepalive` gets
//! its head early (200, `text/event-stream`, `x-sluice-queued: true`) and then an SSE comment every
//! interval — `: sluice queued position=12 waited=31s` — so that whatever sits between the app and sluice
//! (an nginx, a load balancer, a corporate proxy) does not cut the idle connection. The exchange itself
//! (admission, the upstream, retries) runs in a task of its own; once it answers, its events follow in
//! the same stream. The price of the early head: a later failure — the upstream's 4xx/5xx, the deadline,
//! a shutdown — can only be one in-band `data: {"error": …}` event, carrying the status, type and message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::attempts::Progress;
use super::body::{Relay, ResponseBody, Settled};
use super::request::{BudgetHold, Inspection, Outgoing};
use super::track::{outcome_of, Track};
use super::{Generation, Proxy};
use crate::admission::Entry;
use crate::catch_unwind::{panic_message, CatchUnwind};
use crate::error::{error_event, ProxyError};
use crate::observe::{self, Metrics};

/// The header that marks a head sent before the request was answered.
pub const QUEUED_HEADER: &str = "x-sluice-queued";
/// The most of an error body read to turn it into an in-band event.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// How long reading that error body may take.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

type Answer = (Result<Response<ResponseBody>, ProxyError>, Progress);

/// Aborts the exchange when whoever waits for it goes away (the client left).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who the request's outcome is counted for, once it settles after an early head.
struct Payer {
    metrics: Arc<Metrics>,
    model_label: String,
    client: Arc<str>,
    limits: crate::config::LimitsConfig,
}

impl Proxy {
    /// Step 8 for streaming requests: the exchange as usual, but should it give no answer within the
    /// keep-alive interval, the head goes out and comments follow until it does.
    pub(super) async fn exchange_keeping_alive(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        outgoing: Outgoing,
        seen: Inspection,
        deadline: Instant,
        budget: BudgetHold,
        track: &mut Track,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let interval = generation.config.queue.stream_keepalive;
        let entry = Arc::new(Entry::default());
        let (answer_tx, mut answer) = oneshot::channel::<Answer>();
        let exchange = tokio::spawn({
            let (proxy, generation, entry) = (self.clone(), generation.clone(), entry.clone());
            async move {
                let exchange = CatchUnwind::new(async {
                    let mut progress = Progress { entry: Some(entry), ..Progress::default() };
                    let sent =
                        proxy.send_with_retries(&generation, &outgoing, &seen, deadline, &mut progress, None).await;
                    let request = Some((outgoing, seen, deadline, Some(budget)));
                    (sent.and_then(|sent| proxy.respond(sent, &generation, request)), progress)
                });
                // A bug is one request's error, counted and logged as the server does for any request.
                let answer = exchange.await.unwrap_or_else(|panic| {
                    tracing::error!(panic = panic_message(&*panic), "a queued request's exchange failed");
                    proxy.metrics().panicked();
                    let failed = ProxyError::Internal("a bug inside sluice while the request waited".into());
                    (Err(failed), Progress::default())
                });
                let _ = answer_tx.send(answer);
            }
        });
        let exchange = AbortOnDrop(exchange);
        // Should the client leave now, the track counts this wait as cancelled.
        track.progress.wait();
        let since = Instant::now();
        match tokio::time::timeout(interval, &mut answer).await {
            Ok(Ok((response, progress))) => {
                track.progress = progress;
                return response;
            }
            Ok(Err(_)) => return Err(ProxyError::Internal("the request's exchange ended without an answer".into())),
            Err(_) => {}
        }
        // From here on the relay counts the outcome; the track only writes the log line with the body.
        track.progress.waited();
        let payer = track.metrics.take().map(|metrics| Payer {
            metrics,
            model_label: track.log.model_label.clone(),
            client: track.log.client_name.clone(),
            limits: generation.config.limits.clone(),
        });
        // Until the relay says how the request settled: a client that leaves first was cancelled.
        track.log.outcome = "cancelled";
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(relay(self.clone(), exchange, answer, entry, (since, interval), tx, payer));
        let mut response = Response::new(ResponseBody::relayed(rx));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(QUEUED_HEADER, HeaderValue::from_static("true"));
        Ok(response)
    }
}

/// Sends a comment every interval until the exchange answers, then its body (or its failure as one
/// error event). Ends, aborting the exchange, when the client goes away.
async fn relay(
    proxy: Arc<Proxy>,
    exchange: AbortOnDrop,
    mut answer: oneshot::Receiver<Answer>,
    entry: Arc<Entry>,
    (started, interval): (Instant, Duration),
    tx: mpsc::Sender<Relay>,
    payer: Option<Payer>,
) {
    let mut ticks = tokio::time::interval(interval);
    let answered = loop {
        tokio::select! {
            biased; // an answer that is ready goes before another comment
            answered = &mut answer => break answered,
            _ = ticks.tick() => {
                let comment = comment(proxy.admission().position(&entry), started.elapsed());
                // A client that reads nothing misses a comment rather than stalling the relay.
                let _ = tx.try_send(Relay::Frame(Ok(Frame::data(comment))));
            }
            () = tx.closed() => {
                settle(&tx, payer.as_ref(), Settled::cancelled(started)).await;
                return;
            }
        }
    };
    drop(exchange);
    let (response, progress) = match answered {
        Ok(answered) => answered,
        Err(_) => {
            (Err(ProxyError::Internal("the request's exchange ended without an answer".into())), Progress::default())
        }
    };
    let (response, outcome, error) = match response {
        Ok(response) => {
            let outcome = outcome_of(response.status().as_u16());
            (response, outcome, None)
        }
        Err(err) => {
            let (outcome, kind) = (err.outcome(), err.kind());
            (err.into_response(), outcome, Some(kind))
        }
    };
    let status = response.status();
    let model_label = payer
        .as_ref()
        .and_then(|p| progress.model.as_deref().map(|model| observe::model_label(Some(model), &p.limits)));
    // What can follow a head that promised an SSE stream: a plain SSE body, else one error event.
    let streamable = status == StatusCode::OK && super::headers::readable_sse(response.headers());
    let (outcome, error) = match (streamable, status == StatusCode::OK) {
        (false, true) => ("upstream_error", Some("sluice_upstream_stream_error")),
        _ => (outcome, error),
    };
    let settled = Settled { progress, status: status.as_u16(), outcome, model_label, error, read_usage: streamable };
    settle(&tx, payer.as_ref(), settled).await;
    if streamable {
        pipe(response, &tx).await;
        return;
    }
    let event = if status == StatusCode::OK {
        let message = "the upstream answered the stream with something that is not a plain SSE stream";
        error_event(message, "sluice_upstream_stream_error")
    } else {
        in_band_error(response).await
    };
    // An error answer delivered whole: the stream ends as it should after it.
    if tx.send(Relay::Frame(Ok(Frame::data(event)))).await.is_ok() {
        let _ = tx.send(Relay::End).await;
    }
}

/// The comment that keeps the connection busy: the request's place in its queue, or that it waits on
/// (backing off, or for the upstream's answer).
fn comment(position: Option<usize>, waited: Duration) -> Bytes {
    let waited = waited.as_secs();
    Bytes::from(match position {
        Some(ahead) => format!(": sluice queued position={} waited={waited}s\n\n", ahead.saturating_add(1)),
        None => format!(": sluice waiting waited={waited}s\n\n"),
    })
}

impl Settled {
    fn cancelled(started: Instant) -> Self {
        let progress = Progress { waited: started.elapsed(), ..Progress::default() };
        Self { progress, status: 499, outcome: "cancelled", model_label: None, error: None, read_usage: false }
    }
}

/// Counts the outcome and tells the body, for its log line.
async fn settle(tx: &mpsc::Sender<Relay>, payer: Option<&Payer>, settled: Settled) {
    if let Some(payer) = payer {
        let label = settled.model_label.as_deref().unwrap_or(&payer.model_label);
        let progress = &settled.progress;
        payer.metrics.request_answered(settled.outcome, label, &payer.client, progress.waited, progress.throttled);
    }
    let _ = tx.send(Relay::Settled(Box::new(settled))).await;
}

/// Passes the answer's body on, frame by frame, until it ends or the client goes away.
async fn pipe(response: Response<ResponseBody>, tx: &mpsc::Sender<Relay>) {
    let mut body = response.into_body();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return,
        };
        let relay = match frame {
            Some(Ok(frame)) => Relay::Frame(Ok(frame)),
            // The head promised SSE: a failure is one error event (the body's frames are whole events).
            Some(Err(err)) => {
                let event = error_event(&format!("the upstream stream broke: {err}"), "sluice_upstream_stream_error");
                if tx.send(Relay::Frame(Ok(Frame::data(event)))).await.is_ok() {
                    let _ = tx.send(Relay::Broken).await;
                }
                return;
            }
            None if body.broke() => Relay::Broken,
            None => Relay::End,
        };
        let last = !matches!(relay, Relay::Frame(Ok(_)));
        if tx.send(relay).await.is_err() || last {
            return;
        }
    }
}

/// One SSE error event made of an error response: its `error` object (or its text as the message),
/// with the status added, so that the SDKs raise an APIError with the upstream's message.
async fn in_band_error(response: Response<ResponseBody>) -> Bytes {
    let status = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_ERROR_BODY);
    let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    };
    let mut error = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut object)) => match object.remove("error") {
            Some(Value::Object(error)) => error,
            Some(Value::String(message)) => serde_json::Map::from_iter([("message".to_string(), json!(message))]),
            _ => serde_json::Map::new(),
        },
        _ => serde_json::Map::new(),
    };
    if !error.contains_key("message") {
        let text = String::from_utf8_lossy(&body).chars().take(500).collect::<String>();
        let reason = status.canonical_reason().unwrap_or("error");
        let message = if text.trim().is_empty() { format!("{} {reason}", status.as_u16()) } else { text };
        error.insert("message".into(), json!(message));
    }
    error.entry("type").or_insert_with(|| json!("upstream_error"));
    error.entry("code").or_insert(Value::Null);
    error.insert("status".into(), json!(status.as_u16()));
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(json!({ "error": error }).to_string().as_bytes());
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_sse_comments_with_position_and_wait() {
        let text = comment(Some(11), Duration::from_secs(31));
        assert_eq!(&text[..], b": sluice queued position=12 waited=31s\n\n");
        let text = comment(None, Duration::from_millis(15_900));
        assert_eq!(&text[..], b": sluice waiting waited=15s\n\n");
    }

    #[tokio::test]
    async fn an_error_response_becomes_one_event_with_its_status_type_and_message() {
        let body = r#"{"error":{"message":"Invalid model","type":"invalid_request_error","code":"bad_model"}}"#;
        let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        let event = in_band_error(response).await;
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("data: ") && text.ends_with("\n\n"), "{text}");
        let value: Value = serde_json::from_str(text.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(value["error"]["message"], "Invalid model");
        assert_eq!(value["error"]["type"], "invalid_request_error");
        assert_eq!(value["error"]["code"], "bad_model");
        assert_eq!(value["error"]["status"], 400);
    }

    #[tokio::test]
    async fn a_body_that_is_no_json_error_still_gives_a_message() {
        let mut response = Response::new(ResponseBody::full(Bytes::from_static(b"<html>bad gateway</html>")));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        let event = in_band_error(response).await;
        let value: Value = serde_json::from_slice(&event[6..]).unwrap();
        assert_eq!(value["error"]["message"], "<html>bad gateway</html>");
        assert_eq!(value["error"]["status"], 502);
        let mut response = Response::new(ResponseBody::full(Bytes::new()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let value: Value = serde_json::from_slice(&in_band_error(response).await[6..]).unwrap();
        assert_eq!(value["error"]["message"], "503 Service Unavailable");
    }
}
