//! The request line written by hand: byte for byte what tracing-subscriber's text or JSON format writes
//! for the same event (the test below holds the two to the same bytes), without the per-field
//! visitor and formatting layers that made the line the largest cost of a request on the writer thread.

use std::io::Write;
use std::time::SystemTime;

use super::request_log::RequestLine;
use crate::config::LogFormat;

impl RequestLine {
    /// Writes the line into `out` as `emit` would have it written in `format`, stamped `at`: the same
    /// fields, in the same order (a test holds the two to the same bytes). False, with nothing written,
    /// for a time the stamp cannot be written for (before 1970, after 9999): `emit` writes that one.
    pub(super) fn write_to(&self, format: LogFormat, at: SystemTime, out: &mut Vec<u8>) -> bool {
        let target = Self::TARGET;
        let Some(mut line) = Fields::start(out, format, at, target, "request") else { return false };
        line.display("request_id", &self.request_id);
        line.display("method", self.method.as_str());
        line.display("path", &self.path);
        line.number("status", self.status);
        line.number("duration_ms", self.duration_ms);
        line.number("bytes", self.bytes);
        line.str("end", self.end());
        line.str("outcome", self.outcome);
        line.str("cache", self.cache);
        line.str("model", self.model.as_deref().unwrap_or("-"));
        line.str("account", self.account.as_deref().unwrap_or("-"));
        line.str("upstream", self.upstream.as_deref().unwrap_or("-"));
        line.bool("stream", self.stream);
        line.hex("client", self.client);
        line.str("client_name", &self.client_name);
        line.number("attempts", self.attempts);
        line.number("queue_ms", self.queue_ms);
        line.maybe("upstream_status", self.upstream_status);
        line.maybe("ttfb_ms", self.ttfb_ms);
        line.maybe("prompt_tokens", self.usage.map(|u| u.prompt_tokens));
        line.maybe("completion_tokens", self.usage.map(|u| u.completion_tokens));
        line.str("error", self.error.unwrap_or("-"));
        line.finish(target);
        true
    }
}

/// The first moment of the year 10000, in seconds since 1970: RFC 3339 has four digits for the year.
const YEAR_10000: u64 = 253_402_300_800;

/// An info line being written into `out`: a start, fields in order, a finish.
pub(super) struct Fields<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
}

// Writing into a `Vec` cannot fail: the results of `write!` below are ignored for that reason.
impl<'a> Fields<'a> {
    /// Starts an info line of `target` stamped `at`, its message first; None for a time out of RFC
    /// 3339's range (the formatter would fail or panic on it).
    pub fn start(out: &'a mut Vec<u8>, format: LogFormat, at: SystemTime, target: &str, message: &str) -> Option<Self> {
        let since_1970 = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        if since_1970.as_secs() >= YEAR_10000 {
            return None;
        }
        let stamp = humantime::format_rfc3339_micros(at);
        let json = format == LogFormat::Json;
        if json {
            let _ = write!(out, "{{\"timestamp\":\"{stamp}\",\"level\":\"INFO\",\"message\":");
            string(out, message);
        } else {
            let _ = write!(out, "{stamp}  INFO {target}: {message}");
        }
        Some(Self { out, json })
    }

    /// Starts a field: text `name=`, JSON `,"name":`.
    fn name(&mut self, name: &str) {
        let (before, after): (&[u8], &[u8]) = if self.json { (b",\"", b"\":") } else { (b" ", b"=") };
        self.out.extend_from_slice(before);
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(after);
    }

    /// A field recorded with `%` (Display): bare in text, a string in JSON.
    pub fn display(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            string(self.out, value);
        } else {
            self.out.extend_from_slice(value.as_bytes());
        }
    }

    /// A `u64` as 16 hex digits, recorded with `format_args!` (a Display): as `display`.
    pub fn hex(&mut self, name: &str, value: u64) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.name(name);
        let mut hex = [0u8; 16];
        for (at, digit) in hex.iter_mut().enumerate() {
            let nibble = (value >> (60 - 4 * at)) & 0xf;
            *digit = DIGITS[usize::try_from(nibble).unwrap_or(0)];
        }
        let quote: &[u8] = if self.json { b"\"" } else { b"" };
        self.out.extend_from_slice(quote);
        self.out.extend_from_slice(&hex);
        self.out.extend_from_slice(quote);
    }

    /// A string field: Debug-quoted in text, a string in JSON.
    pub fn str(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            string(self.out, value);
        } else if value.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\') {
            // What Debug would write, without its walk through each character's escape.
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    /// A number: bare in both.
    pub fn number(&mut self, name: &str, value: impl Into<u64>) {
        self.name(name);
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut left: u64 = value.into();
        loop {
            at -= 1;
            // The remainder of a division by ten: a digit, in range whatever `left` is.
            digits[at] = b'0' + u8::try_from(left % 10).unwrap_or(0);
            left /= 10;
            if left == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&digits[at..]);
    }

    /// A boolean: bare in both.
    pub fn bool(&mut self, name: &str, value: bool) {
        self.name(name);
        self.out.extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// An optional number: left out when None, as tracing leaves out an `Option` field.
    pub fn maybe(&mut self, name: &str, value: Option<impl Into<u64>>) {
        if let Some(value) = value {
            self.number(name, value);
        }
    }

    /// Ends the line (JSON: its target last).
    pub fn finish(self, target: &str) {
        if self.json {
            let _ = write!(self.out, ",\"target\":");
            string(self.out, target);
            self.out.push(b'}');
        }
        self.out.push(b'\n');
    }
}

/// `value` as a JSON string, escaped as tracing-subscriber's JSON format escapes it (serde_json).
fn string(out: &mut Vec<u8>, value: &str) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Method;
    use tracing_subscriber::prelude::*;

    use super::*;
    use crate::observe::log::tests::Sink;
    use crate::observe::request_log::End;
    use crate::observe::usage::Usage;

    /// The line as tracing-subscriber writes `emit`'s event, set up as the daemon sets it up.
    fn through_tracing(line: &RequestLine, format: LogFormat) -> String {
        let written = Sink::default();
        let sink = written.clone();
        let layer = super::super::log::format_layer(format, move || sink.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || line.emit());
        written.text()
    }

    #[test]
    fn the_line_written_by_hand_is_byte_for_byte_the_one_tracing_writes() {
        let mut every_field = RequestLine::sample();
        every_field.request_id = "sluice-00ff".into();
        every_field.method = Method::from_bytes(b"PATCH").unwrap();
        every_field.path = "/v1/a\"b\\c/é…".into();
        every_field.status = 503;
        every_field.end = End::ClientGone;
        every_field.model = Some(Arc::from("deep\"seek\n\u{7}\u{301}"));
        every_field.account = Some(Arc::from("team a"));
        every_field.upstream = Some(Arc::from("fallback:b"));
        every_field.stream = true;
        every_field.client = u64::MAX - 5;
        every_field.client_name = Arc::from("name\twith tab, \x1b[31m, \u{85}, \x7f");
        every_field.attempts = 4;
        every_field.queue_ms = 12_345;
        every_field.upstream_status = Some(429);
        every_field.ttfb_ms = Some(7);
        every_field.usage = Some(Usage { prompt_tokens: 11, completion_tokens: 22, ..Usage::default() });
        every_field.error = Some("upstream_timeout");
        for line in [RequestLine::sample(), every_field] {
            for format in [LogFormat::Text, LogFormat::Json] {
                let reference = through_tracing(&line, format);
                let stamp = match format {
                    LogFormat::Text => reference.split(' ').next().unwrap().to_string(),
                    LogFormat::Json => {
                        let value: serde_json::Value = serde_json::from_str(&reference).unwrap();
                        value["timestamp"].as_str().unwrap().to_string()
                    }
                };
                let mut by_hand = Vec::new();
                assert!(line.write_to(format, humantime::parse_rfc3339(&stamp).unwrap(), &mut by_hand));
                assert_eq!(String::from_utf8(by_hand).unwrap(), reference, "{format:?}");
            }
        }
    }

    #[test]
    fn a_time_the_stamp_cannot_be_written_for_is_left_to_tracing() {
        let line = RequestLine::sample();
        let mut out = Vec::new();
        let before_1970 = SystemTime::UNIX_EPOCH.checked_sub(std::time::Duration::from_secs(1)).unwrap();
        assert!(!line.write_to(LogFormat::Text, before_1970, &mut out));
        let year_10000 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(YEAR_10000);
        assert!(!line.write_to(LogFormat::Json, year_10000, &mut out));
        assert!(out.is_empty(), "a partial line was left behind");
        let last_second = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(YEAR_10000 - 1);
        assert!(line.write_to(LogFormat::Text, last_second, &mut out));
        assert!(String::from_utf8(out).unwrap().starts_with("9999-12-31T23:59:59.000000Z  INFO "));
    }
}
