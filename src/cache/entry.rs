//! A stored answer: what a complete, successful upstream response becomes in the cache, and its bytes in
//! a backend. A JSON answer is kept as received; a stream is kept as its `data:` events (keep-alive
//! comments dropped) and replayed as a well-formed stream. Whatever was cut, stalled or carried an error is
//! never made an entry. Large entries are zstd-compressed; bytes read back from a backend are checked and
//! bounded, and anything malformed is just a miss.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::observe::{Usage, UsageTail};

/// The largest answer kept (and the most a stored entry may decompress to).
pub const MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;
/// Entries larger than this are stored compressed.
const COMPRESS_ABOVE: usize = 16 * 1024;
const MAGIC: &[u8; 4] = b"slc1";
const COMPRESSED: u8 = 1;

/// How an entry is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// One JSON body.
    Json,
    /// An SSE stream: `data:` events ending with `data: [DONE]`.
    Events,
}

/// A stored answer, ready to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub form: Form,
    pub content_type: Bytes,
    /// The body as replayed: the JSON as received, or the stream's events.
    pub body: Bytes,
    /// The answer's token usage, if it reported one: what a hit saves.
    pub usage: Option<Usage>,
    /// When it was stored (seconds since the Unix epoch), for `Age`.
    pub stored_at: u64,
}

impl Entry {
    /// The entry for a complete 200 response, if it is one worth keeping: JSON without an `error`, or a
    /// stream whose every event is whole, none an error, ending with `[DONE]`.
    pub fn from_response(content_type: &[u8], body: &[u8], stored_at: u64) -> Option<Self> {
        if body.len() > MAX_ENTRY_BYTES {
            return None;
        }
        let media = content_type.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
        let (form, body) = if media.eq_ignore_ascii_case(b"text/event-stream") {
            (Form::Events, replayable_events(body)?)
        } else if media.eq_ignore_ascii_case(b"application/json") {
            let value: Value = serde_json::from_slice(body).ok()?;
            whole_answer(&value).then_some(())?;
            (Form::Json, Bytes::copy_from_slice(body))
        } else {
            return None;
        };
        let mut tail = UsageTail::default();
        tail.observe(&body);
        Some(Self { form, content_type: Bytes::copy_from_slice(content_type), body, usage: tail.usage(), stored_at })
    }

    /// The bytes a backend keeps.
    pub fn encode(&self) -> Vec<u8> {
        let compressed = (self.body.len() > COMPRESS_ABOVE)
            .then(|| zstd::bulk::compress(&self.body, 3).ok())
            .flatten()
            .filter(|c| c.len() < self.body.len());
        let payload = compressed.as_deref().unwrap_or(&self.body);
        let mut out = BytesMut::with_capacity(64 + self.content_type.len() + payload.len());
        out.put_slice(MAGIC);
        out.put_u8(u8::from(self.form == Form::Events));
        out.put_u8(if compressed.is_some() { COMPRESSED } else { 0 });
        out.put_u64(self.stored_at);
        match self.usage {
            Some(usage) => {
                out.put_u8(1);
                for (_, count) in usage.kinds() {
                    out.put_u64(count);
                }
            }
            None => out.put_u8(0),
        }
        out.put_u16(u16::try_from(self.content_type.len()).unwrap_or(0));
        out.put_slice(if self.content_type.len() <= usize::from(u16::MAX) { &self.content_type } else { b"" });
        out.put_slice(payload);
        out.to_vec()
    }

    /// An entry from a backend's bytes, or None if they are not one (another version, cut, or a body that
    /// would decompress beyond the bound).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut reader = Reader(bytes);
        (reader.take(4)? == MAGIC).then_some(())?;
        let form = match reader.u8()? {
            0 => Form::Json,
            1 => Form::Events,
            _ => return None,
        };
        let flags = reader.u8()?;
        let stored_at = reader.u64()?;
        let usage = match reader.u8()? {
            0 => None,
            1 => Some(Usage {
                prompt_tokens: reader.u64()?,
                completion_tokens: reader.u64()?,
                prompt_cache_hit_tokens: reader.u64()?,
                prompt_cache_miss_tokens: reader.u64()?,
                completion_tokens_details: reader.u64()?,
            }),
            _ => return None,
        };
        let type_len = usize::from(u16::from_be_bytes(reader.take(2)?.try_into().ok()?));
        let content_type = Bytes::copy_from_slice(reader.take(type_len)?);
        let payload = reader.0;
        let body = if flags & COMPRESSED != 0 {
            Bytes::from(zstd::bulk::decompress(payload, MAX_ENTRY_BYTES).ok()?)
        } else if payload.len() <= MAX_ENTRY_BYTES {
            Bytes::copy_from_slice(payload)
        } else {
            return None;
        };
        Some(Self { form, content_type, body, usage, stored_at })
    }

    /// What the entry weighs in memory.
    pub fn weight(&self) -> u64 {
        (self.body.len() + self.content_type.len() + 128) as u64
    }
}

/// The stream's `data:` events, re-written one per event (`data: …\n\n`), or None unless every event is
/// whole, none carries an `error`, and the stream ends with `[DONE]`.
fn replayable_events(body: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(body).ok()?;
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let complete = text.ends_with("\n\n") || text.ends_with("[DONE]") || text.ends_with("[DONE]\n");
    complete.then_some(())?;
    let mut out = String::with_capacity(text.len());
    let mut done = false;
    for event in text.split("\n\n") {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|value| value.strip_prefix(' ').unwrap_or(value))
            .collect();
        if data.is_empty() {
            continue; // a comment (`: keep-alive`), or the space between events
        }
        if done {
            return None; // nothing belongs after [DONE]
        }
        let joined = data.join("\n");
        if joined.trim() == "[DONE]" {
            done = true;
        } else {
            let value: Value = serde_json::from_str(&joined).ok()?;
            whole_answer(&value).then_some(())?;
        }
        for line in data {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    done.then(|| Bytes::from(out))
}

/// Whether a JSON answer (or stream chunk) is one to keep: an object without an `error`, and no choice
/// cut short by the upstream (`finish_reason: insufficient_system_resource`).
fn whole_answer(value: &Value) -> bool {
    let Some(object) = value.as_object() else { return false };
    let cut_short = object
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|c| c["finish_reason"] == "insufficient_system_resource"));
    !object.contains_key("error") && !cut_short
}

/// Reads big-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": keep-alive\n\n\
        data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\r\n\r\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn a_stream_is_kept_as_its_events() {
        let entry = Entry::from_response(b"text/event-stream; charset=utf-8", STREAM.as_bytes(), 7).unwrap();
        assert_eq!(entry.form, Form::Events);
        let body = std::str::from_utf8(&entry.body).unwrap();
        assert!(!body.contains("keep-alive") && !body.contains('\r'), "{body}");
        assert_eq!(body.matches("data: ").count(), 4);
        assert!(body.ends_with("data: [DONE]\n\n"));
        assert_eq!(entry.usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((5, 2)));
    }

    #[test]
    fn broken_or_failed_answers_are_not_kept() {
        let cut = &STREAM[..STREAM.len() - "data: [DONE]\n\n".len()];
        assert!(Entry::from_response(b"text/event-stream", cut.as_bytes(), 0).is_none(), "no [DONE]");
        let mid_event = &STREAM[..60];
        assert!(Entry::from_response(b"text/event-stream", mid_event.as_bytes(), 0).is_none());
        let failed = "data: {\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"cut\"}}\n\ndata: [DONE]\n\n";
        assert!(Entry::from_response(b"text/event-stream", failed.as_bytes(), 0).is_none(), "an error event");
        assert!(Entry::from_response(b"application/json", b"{\"error\":{}}", 0).is_none());
        let cut_short =
            br#"{"choices":[{"message":{"content":"par"},"finish_reason":"insufficient_system_resource"}]}"#;
        assert!(Entry::from_response(b"application/json", cut_short, 0).is_none(), "cut short by the upstream");
        assert!(Entry::from_response(b"application/json", b"{\"id\":", 0).is_none(), "cut JSON");
        assert!(Entry::from_response(b"text/plain", b"hello", 0).is_none());
    }

    #[test]
    fn entries_round_trip_compressed_or_not() {
        let small = Entry::from_response(b"application/json", br#"{"id":"a","usage":{"prompt_tokens":3}}"#, 9).unwrap();
        assert_eq!(Entry::decode(&small.encode()), Some(small.clone()));
        let big_text = format!("{{\"text\":\"{}\"}}", "all work and no play ".repeat(5000));
        let big = Entry::from_response(b"application/json", big_text.as_bytes(), 9).unwrap();
        let encoded = big.encode();
        assert!(encoded.len() < big.body.len() / 10, "compressed: {} of {}", encoded.len(), big.body.len());
        assert_eq!(Entry::decode(&encoded), Some(big));
    }

    #[test]
    fn foreign_bytes_are_a_miss() {
        let encoded = Entry::from_response(b"application/json", b"{}", 1).unwrap().encode();
        for cut in 0..encoded.len() {
            assert!(Entry::decode(&encoded[..cut]).is_none() || cut >= encoded.len() - 2, "cut at {cut}");
        }
        assert!(Entry::decode(b"redis said something else").is_none());
        let mut bomb = encoded[..4 + 2 + 8 + 1].to_vec();
        bomb[5] = COMPRESSED;
        bomb.extend_from_slice(&0u16.to_be_bytes());
        bomb.extend_from_slice(&zstd::bulk::compress(&vec![0u8; MAX_ENTRY_BYTES + 1], 3).unwrap());
        assert!(Entry::decode(&bomb).is_none(), "decompressing beyond the bound");
    }
}
