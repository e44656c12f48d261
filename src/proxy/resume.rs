//! Mid-stream resume: a streaming chat completion that breaks or stalls after content was sent is
//! continued instead of ending in an error. sluice asks the upstream that was answering to go on with the
//! same message by chat prefix completion — `POST /beta/chat/completions` with the original messages plus
//! `{"role": "assistant", "content": <content delivered so far>, "prefix": true}` — and splices the
//! continuation's events into the client's stream: the original's `id`, `created` and `model`, no second
//! role chunk, and in the final usage chunk the continuation's usage plus an estimate of the cut call's
//! (one token per event delivered before the cut; its own usage never arrived).
//!
//! Only when it is sound: one choice, the cut came in `content` (not in `reasoning_content`, not in a
//! tool call, not after the finish), the request had no prefix message of its own, not during a
//! shutdown; at most `MAX_RESUMES` per request. A continuation that is refused (a fallback that does not
//! do prefix completion answers 400) ends the stream with the in-band error of the *original* cut.
//! The relay runs in its own task and feeds the client's body (`Relay`); the slot is held by whichever
//! upstream body is being read.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::attempts::Progress;
use super::body::StreamBroke;
use super::events::{self, Chunk, Identity};
use super::request::{BudgetHold, Inspection, Outgoing};
use super::{BoxError, Generation, Proxy, Relay, ResponseBody};
use crate::error::error_event;
use crate::observe::Usage;

/// Continuations per request, at most.
pub const MAX_RESUMES: u32 = 2;
const CONTINUE_PATH: &str = "/beta/chat/completions";

/// A request whose stream may be resumed: a streaming chat completion of one choice, without a prefix
/// message of its own.
pub struct Resumable;

impl Resumable {
    /// The plan for a request, if its stream could be resumed.
    pub fn of(path: &str, body: &[u8]) -> Option<Self> {
        if !path.split('?').next().unwrap_or("").ends_with("/chat/completions") {
            return None;
        }
        let request: Map<String, Value> = serde_json::from_slice(body).ok()?;
        let streaming = request.get("stream").and_then(Value::as_bool) == Some(true);
        let one_choice = request.get("n").is_none_or(|n| n.as_u64() == Some(1));
        let messages = request.get("messages")?.as_array()?;
        let own_prefix = messages.iter().any(|m| m.get("prefix").and_then(Value::as_bool) == Some(true));
        (streaming && one_choice && !own_prefix).then_some(Self)
    }

    /// The continuation's body: the request (as the answering upstream got it) with the content so far as
    /// an assistant prefix, and its token budget less what was delivered (about one token an event).
    fn continuation(sent: &[u8], content: &str, delivered: u64) -> Option<Bytes> {
        let mut request: Map<String, Value> = serde_json::from_slice(sent).ok()?;
        let messages = request.get_mut("messages")?.as_array_mut()?;
        messages.push(serde_json::json!({ "role": "assistant", "content": content, "prefix": true }));
        for budget in ["max_tokens", "max_completion_tokens"] {
            if let Some(left) = request.get(budget).and_then(Value::as_u64) {
                request.insert(budget.to_string(), Value::from(left.saturating_sub(delivered).max(1)));
            }
        }
        serde_json::to_vec(&request).ok().map(Bytes::from)
    }
}

/// Everything the relay needs to ask for a continuation.
pub struct Continuation {
    pub generation: Arc<Generation>,
    /// The request as the answering target got it.
    pub outgoing: Outgoing,
    pub seen: Inspection,
    pub deadline: Instant,
    /// The target that answered (continuations go there).
    pub target: usize,
    /// The request body's share of the budget, held while the body is (for a continuation or a redo).
    pub _hold: Option<BudgetHold>,
}

/// Where the stream stands.
#[derive(Default)]
struct Spliced {
    identity: Identity,
    /// `content` delivered so far.
    content: String,
    /// The last model output was content (not reasoning).
    in_content: bool,
    tool_calls: bool,
    finished: bool,
    /// Content and reasoning events delivered (about one token each).
    events: u64,
    /// Reading a continuation: its events are rewritten.
    continuing: bool,
    resumes: u32,
    /// `events` when the last continuation began.
    resume_events: u64,
}

impl Spliced {
    fn sound(&self) -> bool {
        self.in_content && !self.tool_calls && !self.finished && !self.content.is_empty()
    }

    /// Takes in an event-aligned chunk; returns what goes to the client.
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        let mut rewritten: Option<Vec<u8>> = self.continuing.then(Vec::new);
        for event in events::split(&chunk) {
            let Some(data) = events::data(event) else {
                if let Some(out) = &mut rewritten {
                    out.extend_from_slice(event);
                    out.extend_from_slice(b"\n\n");
                }
                continue;
            };
            if let Some(parsed) = Chunk::parse(&data) {
                self.observe(&parsed);
                if let Some(out) = &mut rewritten {
                    let usage = parsed.usage.map(|u| self.summed(u));
                    if let Some(event) = self.identity.rewrite(&data, usage.as_ref()) {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(event.as_bytes());
                        out.extend_from_slice(b"\n\n");
                    }
                    continue;
                }
            }
            if !self.continuing {
                self.identity.learn(&data);
            } else if let Some(out) = &mut rewritten {
                out.extend_from_slice(event);
                out.extend_from_slice(b"\n\n");
            }
        }
        rewritten.map_or(chunk, Bytes::from)
    }

    fn observe(&mut self, chunk: &Chunk) {
        if let Some(content) = &chunk.content {
            self.content.push_str(content);
            self.in_content = true;
            self.events += 1;
        }
        if chunk.reasoning.is_some() {
            self.in_content = false;
            self.events += 1;
        }
        self.tool_calls |= chunk.tool_calls || chunk.other_choices;
        self.finished |= chunk.finish_reason.is_some() || chunk.done;
    }

    /// The continuation's usage plus the estimate of the calls it continued.
    fn summed(&self, continuation: Usage) -> Usage {
        let before = self.resume_events;
        let first_prompt = continuation.prompt_tokens.saturating_sub(before);
        Usage {
            prompt_tokens: continuation.prompt_tokens + u64::from(self.resumes) * first_prompt,
            completion_tokens: continuation.completion_tokens + before,
            ..continuation
        }
    }
}

/// Relays `first` (a stream reporting its cuts) to the client through `tx`, resuming it when it breaks
/// and that is sound.
pub async fn relay(proxy: Arc<Proxy>, mut continuation: Continuation, first: ResponseBody, tx: mpsc::Sender<Relay>) {
    let mut spliced = Spliced::default();
    let mut body = first;
    let mut original_cut: Option<String> = None;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return, // the client went away: the upstream body goes with this task
        };
        let cut: BoxError = match frame {
            None => {
                let _ = tx.send(Relay::End).await;
                return;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let out = spliced.pass(data);
                    if !out.is_empty() && tx.send(Relay::Frame(Ok(http_body::Frame::data(out)))).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Some(Err(cut)) => cut,
        };
        let shutting_down = matches!(cut.downcast_ref::<StreamBroke>(), Some(StreamBroke::ShuttingDown));
        let kind = if shutting_down { "sluice_shutting_down" } else { "sluice_upstream_stream_error" };
        let why = original_cut.get_or_insert_with(|| cut.to_string()).clone();
        drop(body); // the broken attempt's slot goes back before the continuation waits for one
        if !shutting_down && spliced.sound() && spliced.resumes < MAX_RESUMES {
            spliced.resume_events = spliced.events;
            let next = tokio::select! {
                next = next_part(&proxy, &mut continuation, &spliced) => next,
                () = tx.closed() => return, // the client went away while the continuation waited
            };
            match next {
                Some(next) => {
                    tracing::info!(error = %why, "resuming the stream by prefix completion");
                    proxy.metrics.resume("resumed");
                    spliced.resumes += 1;
                    spliced.continuing = true;
                    body = next;
                    continue;
                }
                None => proxy.metrics.resume("refused"),
            }
        }
        tracing::warn!(error = %why, "ending the client's stream with an error event");
        let event = error_event(&why, kind);
        let _ = tx.send(Relay::Frame(Ok(http_body::Frame::data(event)))).await;
        let _ = tx.send(Relay::Broken).await;
        return;
    }
}

/// The continuation's body, if the answering upstream takes the prefix completion (a 200 stream).
async fn next_part(proxy: &Proxy, continuation: &mut Continuation, spliced: &Spliced) -> Option<ResponseBody> {
    let generation = continuation.generation.clone();
    let target = &generation.targets[continuation.target];
    let body = Resumable::continuation(continuation.outgoing.body(), &spliced.content, spliced.events)?;
    let outgoing = continuation.outgoing.sibling(&target.upstream, CONTINUE_PATH, body)?;
    // A wait of its own (the request's may be nearly spent), at the front of its client's queue.
    let deadline = Instant::now().checked_add(generation.config.queue.max_wait).unwrap_or(continuation.deadline);
    let mut progress = Progress { attempts: 1, ..Progress::default() };
    let only = Some(continuation.target);
    let sent = proxy
        .send_with_retries(&generation, &outgoing, &continuation.seen, deadline, &mut progress, only)
        .await
        .ok()?;
    let sse = sent
        .response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if sent.response.status() != StatusCode::OK || !sse {
        tracing::warn!(status = sent.response.status().as_u16(), "the upstream refused to continue the stream");
        return None;
    }
    let idle = generation.config.upstream.idle_timeout;
    let (_, incoming) = sent.response.into_parts();
    let mut body = ResponseBody::upstream(sent.prefix, incoming, idle, true, proxy.stop.watch()).report_cuts();
    body.hold(sent.permit);
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sound_requests_are_resumable() {
        let body = |extra: &str| {
            format!(r#"{{"model":"m","stream":true{extra},"messages":[{{"role":"user","content":"x"}}]}}"#)
        };
        assert!(Resumable::of("/v1/chat/completions", body("").as_bytes()).is_some());
        assert!(Resumable::of("/v1/chat/completions", body(r#","n":1"#).as_bytes()).is_some());
        assert!(Resumable::of("/v1/chat/completions", body(r#","n":2"#).as_bytes()).is_none(), "several choices");
        assert!(Resumable::of("/v1/completions", body("").as_bytes()).is_none(), "not a chat completion");
        let not_streaming = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        assert!(Resumable::of("/v1/chat/completions", not_streaming.as_bytes()).is_none());
        let own_prefix =
            r#"{"model":"m","stream":true,"messages":[{"role":"assistant","content":"Once","prefix":true}]}"#;
        assert!(Resumable::of("/beta/chat/completions", own_prefix.as_bytes()).is_none(), "a prefix of its own");
    }

    #[test]
    fn the_continuation_asks_for_the_rest_within_the_budget_left() {
        let sent = br#"{"model":"m","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"x"}]}"#;
        let body = Resumable::continuation(sent, "Once upon", 40).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["max_tokens"], 60);
        let last = &value["messages"][1];
        assert_eq!(
            (last["role"].as_str(), last["content"].as_str(), last["prefix"].as_bool()),
            (Some("assistant"), Some("Once upon"), Some(true))
        );
    }

    fn chunk(data: &str) -> Bytes {
        Bytes::from(format!("data: {data}\n\n"))
    }

    #[test]
    fn a_cut_is_sound_only_in_content() {
        let mut spliced = Spliced::default();
        spliced.pass(chunk(r#"{"id":"a","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!spliced.sound(), "nothing delivered yet");
        spliced.pass(chunk(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}"#));
        assert!(!spliced.sound(), "cut while thinking");
        spliced.pass(chunk(r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#));
        assert!(spliced.sound());
        let mut tools = Spliced::default();
        tools.pass(chunk(r#"{"choices":[{"index":0,"delta":{"content":"Let me"}}]}"#));
        tools.pass(chunk(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#));
        assert!(!tools.sound(), "a tool call");
        let mut finished = Spliced::default();
        finished.pass(chunk(r#"{"choices":[{"index":0,"delta":{"content":"Done"},"finish_reason":"stop"}]}"#));
        assert!(!finished.sound(), "after the finish");
    }

    #[test]
    fn a_continuation_reads_as_the_original() {
        let mut spliced = Spliced::default();
        let original =
            chunk(r#"{"id":"orig","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#);
        assert_eq!(spliced.pass(original.clone()), original, "the original passes untouched");
        spliced.resume_events = spliced.events;
        spliced.resumes = 1;
        spliced.continuing = true;
        let role = chunk(
            r#"{"id":"cont","created":9,"model":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
        );
        assert_eq!(&spliced.pass(role)[..], b"", "no second role chunk");
        let more = spliced.pass(chunk(
            r#"{"id":"cont","created":9,"model":"x","choices":[{"index":0,"delta":{"content":" there"}}]}"#,
        ));
        let text = String::from_utf8_lossy(&more);
        assert!(text.contains("\"id\":\"orig\"") && text.contains(" there") && !text.contains("\"cont\""), "{text}");
        assert_eq!(spliced.content, "Hi there");
    }
}
