//! The start of a deliverable response, read before anything reaches the client — so that what can
//! still be redone invisibly is:
//! - a non-streaming JSON 200 is held until complete (up to `MAX_HELD`): a body cut mid-way is retried
//!   instead of reaching the client truncated. Leading blank lines — DeepSeek's keep-alive while it
//!   queues the request — cannot wait: the response is delivered as soon as one comes (the status is then
//!   committed and the body flows on as it arrives);
//! - a stream, when a fallback could take over, must show content (not just keep-alive comments or the
//!   role-only first chunk) within `fallback.first_token_timeout`, else it is abandoned for the fallback;
//!   a stream that ends or breaks before any content is retried like a failed attempt.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::events;
use crate::upstream::UpstreamBody;

/// A non-streaming body held until complete, at most this large (larger ones flow as they arrive).
pub const MAX_HELD: usize = 1024 * 1024;

/// What the start of a response came to.
pub enum Start {
    /// Deliver it: `prefix` (already read) comes before the rest of `response`'s body; `complete` when
    /// the prefix is the whole body.
    Deliver { response: Response<UpstreamBody>, prefix: Vec<Bytes>, complete: bool },
    /// Nothing reached the client and the body failed, or no content came in time: another attempt.
    Redo(Redo),
}

/// Why a response is redone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redo {
    /// The body broke, stalled or ended before it was complete (or before any content).
    Cut,
    /// A stream's first content did not come within `fallback.first_token_timeout`.
    FirstToken,
}

/// Reads the start of `response` as the rules above say. `first_token`: the limit for a stream's first
/// content, when a fallback could take over. `idle`: the longest silence inside a body.
pub async fn start(mut response: Response<UpstreamBody>, first_token: Option<Duration>, idle: Duration) -> Start {
    let headers = response.headers();
    let media = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let encoded =
        headers.get(header::CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let sse = media.trim_start().starts_with("text/event-stream");
    let json = media.trim_start().starts_with("application/json");
    if encoded || response.status() != StatusCode::OK {
        return deliver(response, Vec::new(), false);
    }
    if sse {
        return match first_token {
            Some(limit) => first_content(response, limit, idle).await,
            None => deliver(response, Vec::new(), false),
        };
    }
    if !json {
        return deliver(response, Vec::new(), false);
    }
    hold_json(&mut response, idle).await.map_or(Start::Redo(Redo::Cut), |(prefix, complete)| Start::Deliver {
        response,
        prefix,
        complete,
    })
}

fn deliver(response: Response<UpstreamBody>, prefix: Vec<Bytes>, complete: bool) -> Start {
    Start::Deliver { response, prefix, complete }
}

/// Reads a JSON body until it is complete, a blank line arrives first (keep-alive: deliver now), or it
/// grows past `MAX_HELD`. None when it broke or stalled before.
async fn hold_json(response: &mut Response<UpstreamBody>, idle: Duration) -> Option<(Vec<Bytes>, bool)> {
    let mut held: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        let frame = tokio::time::timeout(idle, response.body_mut().frame()).await.ok()?;
        match frame {
            // Ended: whole only if it is JSON (a connection closed mid-body without a length is a cut).
            None => {
                let body = held.concat();
                if !body.iter().all(u8::is_ascii_whitespace) {
                    serde_json::from_slice::<serde::de::IgnoredAny>(&body).ok()?;
                }
                return Some((held, true));
            }
            Some(Err(_)) => return None,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                size += data.len();
                let keep_alive = size == data.len() && data.iter().all(u8::is_ascii_whitespace) && !data.is_empty();
                held.push(data);
                if keep_alive || size > MAX_HELD {
                    return Some((held, false));
                }
            }
        }
    }
}

/// Reads a stream until its first content event, within `limit` (and `idle` between chunks).
async fn first_content(mut response: Response<UpstreamBody>, limit: Duration, idle: Duration) -> Start {
    let deadline = Instant::now().checked_add(limit).unwrap_or_else(Instant::now);
    let mut held: Vec<Bytes> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let wait = deadline.min(Instant::now().checked_add(idle).unwrap_or(deadline));
        let frame = match tokio::time::timeout_at(wait, response.body_mut().frame()).await {
            Ok(frame) => frame,
            Err(_) if Instant::now() >= deadline => return Start::Redo(Redo::FirstToken),
            Err(_) => return Start::Redo(Redo::Cut),
        };
        match frame {
            None | Some(Err(_)) => return Start::Redo(Redo::Cut),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                pending.extend_from_slice(&data);
                held.push(data);
                // Only whole events are judged; the rest waits for its end.
                let whole = events::complete_len(&pending);
                if events::has_content(&pending[..whole]) {
                    return deliver(response, held, false);
                }
                pending.drain(..whole);
                if held.iter().map(Bytes::len).sum::<usize>() > MAX_HELD {
                    return deliver(response, held, false);
                }
            }
        }
    }
}
