//! Token usage read from a response as it passes: the last `TAIL` bytes are kept (a copy; the client's
//! bytes are never held back), and when the body ends the last `"usage"` object in them is parsed. That
//! finds `usage` at the end of a JSON completion and in the final chunk of an SSE stream sent with
//! `stream_options.include_usage`; a stream without it yields nothing.

use serde::Deserialize;

/// How much of a response's end is kept for finding `usage`.
const TAIL: usize = 8 * 1024;

/// Token counts from an OpenAI/DeepSeek `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_cache_hit_tokens: u64,
    pub prompt_cache_miss_tokens: u64,
    #[serde(deserialize_with = "reasoning_tokens")]
    pub completion_tokens_details: u64,
}

impl Usage {
    /// Each kind with its count, for the tokens metric.
    pub fn kinds(&self) -> [(&'static str, u64); 5] {
        [
            ("prompt", self.prompt_tokens),
            ("completion", self.completion_tokens),
            ("prompt_cache_hit", self.prompt_cache_hit_tokens),
            ("prompt_cache_miss", self.prompt_cache_miss_tokens),
            ("reasoning", self.completion_tokens_details),
        ]
    }
}

/// Tokens a response used when it reported no usage (a stream sent without
/// `stream_options.include_usage`, or one cut short): about four bytes of prompt per token, and one token
/// per stream event (DeepSeek sends about one token per chunk) or four bytes of a JSON answer per token.
/// Only for quotas, which must not be dodged by leaving usage out.
pub fn estimate_tokens(request_bytes: u64, response_bytes: u64, events: u64, stream: bool) -> u64 {
    let completion = if stream { events } else { response_bytes / 4 };
    request_bytes / 4 + completion
}

/// Counts stream events (`data:` at the start of a line) in a chunk.
pub fn count_events(chunk: &[u8]) -> u64 {
    let mut count = 0;
    let mut line_start = true;
    for (i, byte) in chunk.iter().enumerate() {
        if line_start && chunk.get(i..i + 5) == Some(b"data:") {
            count += 1;
        }
        line_start = *byte == b'\n' || *byte == b'\r';
    }
    count
}

/// `completion_tokens_details.reasoning_tokens`, or 0.
fn reasoning_tokens<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Details {
        reasoning_tokens: u64,
    }
    Ok(Option::<Details>::deserialize(deserializer)?.unwrap_or_default().reasoning_tokens)
}

/// The end of a response body, kept to find `usage` in.
#[derive(Debug, Default)]
pub struct UsageTail {
    tail: Vec<u8>,
}

impl UsageTail {
    /// Remembers the end of a chunk that went to the client.
    pub fn observe(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL);
        self.tail.drain(..overflow);
        self.tail.extend_from_slice(chunk);
    }

    /// The last `usage` object seen, if it is one (`"usage": null` is none).
    pub fn usage(&self) -> Option<Usage> {
        const KEY: &[u8] = b"\"usage\"";
        let at = self.tail.windows(KEY.len()).rposition(|w| w == KEY)?;
        let rest = &self.tail[at + KEY.len()..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let value = rest.get(colon..)?.strip_prefix(b":")?;
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Option<Usage>>();
        values.next()?.ok()?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(chunks: &[&str]) -> Option<Usage> {
        let mut tail = UsageTail::default();
        for chunk in chunks {
            tail.observe(chunk.as_bytes());
        }
        tail.usage()
    }

    #[test]
    fn reads_a_json_completions_usage() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"hi \"usage\" in text"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
            "prompt_cache_hit_tokens": 10, "prompt_cache_miss_tokens": 2,
            "completion_tokens_details": {"reasoning_tokens": 4}}}"#;
        let usage = usage_of(&[&body[..30], &body[30..]]).unwrap();
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 7,
                prompt_cache_hit_tokens: 10,
                prompt_cache_miss_tokens: 2,
                completion_tokens_details: 4
            }
        );
    }

    #[test]
    fn reads_the_final_sse_chunks_usage() {
        let usage = usage_of(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        ])
        .unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.completion_tokens_details), (5, 3, 0));
    }

    #[test]
    fn a_stream_without_usage_yields_none() {
        assert_eq!(usage_of(&["data: {\"choices\":[],\"usage\":null}\n\n", "data: [DONE]\n\n"]), None);
        assert_eq!(usage_of(&["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"]), None);
        assert_eq!(usage_of(&[]), None);
        assert_eq!(usage_of(&["{\"usage\": {\"prompt_tokens\": 5"]), None, "cut off");
    }

    #[test]
    fn estimates_when_usage_is_missing() {
        assert_eq!(count_events(b"data: {}\n\n: keep-alive\n\ndata: {\"x\":\"data:\"}\n\ndata: [DONE]\n\n"), 3);
        assert_eq!(estimate_tokens(400, 9000, 30, true), 130);
        assert_eq!(estimate_tokens(400, 800, 0, false), 300);
    }

    #[test]
    fn keeps_only_the_tail() {
        let mut tail = UsageTail::default();
        tail.observe(br#"{"usage":{"prompt_tokens":1}}"#);
        tail.observe(&vec![b' '; 3 * TAIL]);
        assert_eq!(tail.tail.len(), TAIL);
        assert_eq!(tail.usage(), None, "the early usage fell out of the window");
        tail.observe(br#""usage":{"completion_tokens":9}"#);
        assert_eq!(tail.usage().unwrap().completion_tokens, 9);
        assert!(tail.tail.len() <= TAIL);
    }
}
