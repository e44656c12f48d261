//! Reading a chat completion stream's events as they pass: which carry content (for the first-token
//! limit: keep-alive comments and the role-only first chunk do not), what was delivered so far and where
//! the stream stands (for resuming it), and rewriting a continuation's events to read as the original's.

use serde_json::{Map, Value};

use crate::observe::Usage;

/// The complete events in an event-aligned chunk (each without its blank-line terminator).
pub fn split(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    let text = chunk;
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < text.len() {
            let rest = &text[start..];
            let end = find_boundary(rest);
            let (event, next) = match end {
                Some((at, len)) => (&rest[..at], start + at + len),
                None => (rest, text.len()),
            };
            start = next;
            if !event.iter().all(|b| matches!(b, b'\n' | b'\r')) {
                return Some(event);
            }
        }
        None
    })
}

/// How much of `bytes` is whole events (up to and with the last blank line, whatever the line ends).
pub fn complete_len(bytes: &[u8]) -> usize {
    let mut end = 0;
    while let Some((at, len)) = find_boundary(&bytes[end..]) {
        end += at + len;
    }
    end
}

/// Where the first blank line (an event's end) starts in `bytes`, and its length.
fn find_boundary(bytes: &[u8]) -> Option<(usize, usize)> {
    [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"]
        .iter()
        .filter_map(|terminator| {
            let at = bytes.windows(terminator.len()).position(|w| w == *terminator)?;
            Some((at, terminator.len()))
        })
        .min_by_key(|(at, len)| (*at, std::cmp::Reverse(*len)))
}

/// The data of an event (its `data:` lines joined), if it has any.
pub fn data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// What one data event says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Chunk {
    pub done: bool,
    /// `delta.content` of the first choice (`text` for a text completion).
    pub content: Option<String>,
    /// Another field of the delta with a value (anything beyond the role).
    pub other_delta: bool,
    pub reasoning: Option<String>,
    pub tool_calls: bool,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub error: bool,
    /// Choices other than the first (a request with n > 1).
    pub other_choices: bool,
}

impl Chunk {
    pub fn parse(data: &str) -> Option<Self> {
        if data.trim() == "[DONE]" {
            return Some(Self { done: true, ..Self::default() });
        }
        let value: Value = serde_json::from_str(data).ok()?;
        let object = value.as_object()?;
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let choices = object.get("choices").and_then(Value::as_array);
        let first = choices.and_then(|c| c.first());
        let delta = first.and_then(|c| c.get("delta"));
        let known = ["role", "content", "reasoning_content", "tool_calls"];
        let other_delta = delta.and_then(Value::as_object).is_some_and(|d| {
            d.iter().any(|(k, v)| !known.contains(&k.as_str()) && !v.is_null() && v.as_str() != Some(""))
        });
        Some(Self {
            done: false,
            other_delta,
            content: delta.and_then(|d| d.get("content")).or_else(|| first.and_then(|c| c.get("text"))).and_then(text),
            reasoning: delta.and_then(|d| d.get("reasoning_content")).and_then(text),
            tool_calls: delta.and_then(|d| d.get("tool_calls")).is_some_and(|t| !t.is_null()),
            finish_reason: first.and_then(|c| c.get("finish_reason")).and_then(Value::as_str).map(str::to_string),
            usage: object.get("usage").and_then(|u| serde_json::from_value(u.clone()).ok()),
            error: object.contains_key("error"),
            other_choices: choices.is_some_and(|c| c.iter().any(|c| c.get("index").and_then(Value::as_u64) > Some(0))),
        })
    }

    /// Whether it is more than the role-only first chunk: model output, the end, or an error.
    pub fn is_content(&self) -> bool {
        self.done
            || self.content.is_some()
            || self.other_delta
            || self.reasoning.is_some()
            || self.tool_calls
            || self.finish_reason.is_some()
            || self.usage.is_some()
            || self.error
    }
}

/// Whether an event-aligned chunk holds a content event (see `Chunk::is_content`).
pub fn has_content(chunk: &[u8]) -> bool {
    split(chunk).filter_map(data).filter_map(|d| Chunk::parse(&d)).any(|c| c.is_content())
}

/// The identity of the original stream (`id`, `created`, `model`), which continuation events take on.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Identity {
    fields: Map<String, Value>,
}

impl Identity {
    /// Remembers the identity fields of an original event (the first one that has them wins).
    pub fn learn(&mut self, data: &str) {
        if !self.fields.is_empty() {
            return;
        }
        if let Ok(Value::Object(object)) = serde_json::from_str::<Value>(data) {
            for key in ["id", "created", "model", "system_fingerprint"] {
                if let Some(value) = object.get(key) {
                    self.fields.insert(key.to_string(), value.clone());
                }
            }
        }
    }

    /// A continuation's event, rewritten: the original's identity, no role (the client has had it), and
    /// `usage` replaced by `usage` when given. None for an event to drop (role-only, nothing else).
    pub fn rewrite(&self, data: &str, usage: Option<&Usage>) -> Option<String> {
        if data.trim() == "[DONE]" {
            return Some(data.to_string());
        }
        let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(data) else { return Some(data.to_string()) };
        for (key, value) in &self.fields {
            object.insert(key.clone(), value.clone());
        }
        if let Some(Value::Array(choices)) = object.get_mut("choices") {
            for choice in choices.iter_mut() {
                if let Some(Value::Object(delta)) = choice.get_mut("delta") {
                    // The client has had the role; and the answer's thinking is over (it was cut in content).
                    delta.remove("role");
                    delta.remove("reasoning_content");
                }
            }
        }
        if let (Some(usage), Some(slot)) = (usage, object.get_mut("usage")) {
            if !slot.is_null() {
                *slot = usage_json(usage);
            }
        }
        let blank = |v: &Value| v.is_null() || v.as_str() == Some("");
        let empty = object.get("choices").and_then(Value::as_array).is_some_and(|choices| {
            choices.iter().all(|c| {
                c.get("delta").and_then(Value::as_object).is_some_and(|d| d.values().all(blank))
                    && c.get("finish_reason").is_none_or(Value::is_null)
            })
        }) && object.get("usage").is_none_or(Value::is_null);
        (!empty).then(|| Value::Object(object).to_string())
    }
}

fn usage_json(usage: &Usage) -> Value {
    serde_json::json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_cache_hit_tokens": usage.prompt_cache_hit_tokens,
        "prompt_cache_miss_tokens": usage.prompt_cache_miss_tokens,
        "completion_tokens_details": { "reasoning_tokens": usage.completion_tokens_details },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_aligned_chunks_into_events() {
        let chunk = b": keep-alive\n\ndata: {\"a\":1}\n\ndata: [DONE]\r\n\r\n";
        let events: Vec<&[u8]> = split(chunk).collect();
        assert_eq!(events, [&b": keep-alive"[..], b"data: {\"a\":1}", b"data: [DONE]"]);
        assert_eq!(data(events[0]), None);
        assert_eq!(data(events[1]).as_deref(), Some("{\"a\":1}"));
    }

    #[test]
    fn the_role_only_chunk_and_keep_alives_are_not_content() {
        let role = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert!(!has_content(b": keep-alive\n\n"));
        assert!(!has_content(role));
        assert!(has_content(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n"));
        assert!(has_content(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Hm\"}}]}\n\n"));
        assert!(has_content(b"data: [DONE]\n\n"));
        assert!(has_content(b"data: {\"choices\":[{\"index\":0,\"text\":\"def\"}]}\r\n\r\n"), "a text completion");
        assert_eq!(complete_len(b"data: 1\r\n\r\ndata: 2\n\ndata: 3"), 20, "CRLF and LF events, the last unfinished");
    }

    #[test]
    fn a_continuation_takes_the_originals_identity() {
        let mut identity = Identity::default();
        identity.learn(r#"{"id":"orig","created":1,"model":"deepseek-v4-pro","choices":[]}"#);
        identity.learn(r#"{"id":"other","created":2}"#);
        let role = r#"{"id":"cont","created":9,"model":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(identity.rewrite(role, None), None, "no second role chunk");
        let piece = r#"{"id":"cont","created":9,"model":"x","choices":[{"index":0,"delta":{"content":"lo"}}]}"#;
        let rewritten: Value = serde_json::from_str(&identity.rewrite(piece, None).unwrap()).unwrap();
        assert_eq!((rewritten["id"].as_str(), rewritten["created"].as_u64()), (Some("orig"), Some(1)));
        assert_eq!(rewritten["model"], "deepseek-v4-pro");
        assert_eq!(rewritten["choices"][0]["delta"]["content"], "lo");
        let usage = Usage { prompt_tokens: 7, completion_tokens: 9, ..Usage::default() };
        let last = r#"{"id":"cont","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let rewritten: Value = serde_json::from_str(&identity.rewrite(last, Some(&usage)).unwrap()).unwrap();
        assert_eq!(rewritten["usage"]["completion_tokens"], 9);
        assert_eq!(rewritten["usage"]["total_tokens"], 16);
    }
}
