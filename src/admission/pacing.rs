//! Proactive pacing from an upstream's rate-limit headers (OpenAI style; DeepSeek sends none):
//! `x-ratelimit-remaining-requests` / `x-ratelimit-reset-requests` and the `-tokens` pair. With R requests
//! left until the window resets in T, dispatches are spaced T/R apart until then, so the window is not
//! exhausted early; with none left (requests or tokens), dispatch waits for the reset. A plain struct fed
//! with header values and the time.

use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

/// What an upstream response said about its rate-limit window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl Window {
    /// Reads the headers; `None` when the response carried none of them.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let window = Self {
            remaining_requests: text("x-ratelimit-remaining-requests").and_then(|v| v.parse().ok()),
            reset_requests: text("x-ratelimit-reset-requests").and_then(parse_go_duration),
            remaining_tokens: text("x-ratelimit-remaining-tokens").and_then(|v| v.parse().ok()),
            reset_tokens: text("x-ratelimit-reset-tokens").and_then(parse_go_duration),
        };
        (window != Self::default()).then_some(window)
    }
}

/// A Go-style duration as OpenAI sends them: "1s", "6m0s", "12ms", "1h2m3.5s", "250us".
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * seconds;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// The pacing in force.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Nothing is dispatched before this (the window is exhausted).
    until: Option<Instant>,
    /// While spacing: the gap between dispatches and when the spacing ends.
    gap: Option<(Duration, Instant)>,
    next_slot: Option<Instant>,
}

impl Pacer {
    /// Takes what the latest response said.
    pub fn observe(&mut self, now: Instant, window: Window) {
        let exhausted =
            [(window.remaining_requests, window.reset_requests), (window.remaining_tokens, window.reset_tokens)]
                .into_iter()
                .filter(|(remaining, _)| *remaining == Some(0))
                .map(|(_, reset)| reset.unwrap_or(Duration::from_secs(1)))
                .max();
        if let Some(reset) = exhausted {
            self.until = Some(self.until.map_or(now + reset, |until| until.max(now + reset)));
        }
        match (window.remaining_requests, window.reset_requests) {
            (Some(remaining), Some(reset)) if remaining > 0 => self.gap = Some((reset / remaining as u32, now + reset)),
            _ => {}
        }
    }

    /// `None` when a dispatch may happen now, else when it may.
    pub fn blocked_until(&self, now: Instant) -> Option<Instant> {
        let until = self.until.filter(|until| now < *until);
        let slot = self.next_slot.filter(|slot| now < *slot);
        until.max(slot)
    }

    /// A dispatch happened: while spacing, the next one waits a gap.
    pub fn dispatched(&mut self, now: Instant) {
        self.next_slot = match self.gap {
            Some((gap, ends)) if now < ends => Some(now + gap),
            _ => {
                self.gap = None;
                None
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn go_durations() {
        for (text, ms) in [("1s", 1000), ("6m0s", 360_000), ("12ms", 12), ("1h2m3.5s", 3_723_500), ("250us", 0)] {
            assert_eq!(parse_go_duration(text).map(|d| d.as_millis()), Some(ms), "{text}");
        }
        for bad in ["", "s", "5", "1d", "1.2.3s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn reads_the_headers() {
        let window = Window::from_headers(&headers(&[
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]))
        .unwrap();
        assert_eq!(window.remaining_requests, Some(59));
        assert_eq!(window.reset_tokens, Some(Duration::from_secs(360)));
        assert_eq!(Window::from_headers(&HeaderMap::new()), None, "DeepSeek sends none");
    }

    #[test]
    fn spaces_dispatches_over_what_is_left_of_the_window() {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        // A fixed sequence of responses: 10 left of a window that resets in 1 s.
        pacer.observe(
            start,
            Window { remaining_requests: Some(10), reset_requests: Some(Duration::from_secs(1)), ..Window::default() },
        );
        let mut at = start;
        let mut dispatches = vec![];
        while at < start + Duration::from_secs(1) {
            if let Some(next) = pacer.blocked_until(at) {
                at = next;
                continue;
            }
            dispatches.push(at - start);
            pacer.dispatched(at);
        }
        assert_eq!(dispatches.len(), 10, "{dispatches:?}");
        assert_eq!(dispatches[1], Duration::from_millis(100));
        // Past the reset, no more spacing.
        pacer.dispatched(at);
        assert_eq!(pacer.blocked_until(at), None);
    }

    #[test]
    fn an_exhausted_window_waits_for_its_reset() {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        pacer.observe(
            start,
            Window { remaining_tokens: Some(0), reset_tokens: Some(Duration::from_millis(1500)), ..Window::default() },
        );
        assert_eq!(pacer.blocked_until(start), Some(start + Duration::from_millis(1500)));
        pacer.observe(
            start,
            Window { remaining_requests: Some(0), reset_requests: Some(Duration::from_secs(3)), ..Window::default() },
        );
        assert_eq!(pacer.blocked_until(start + Duration::from_secs(2)), Some(start + Duration::from_secs(3)));
        assert_eq!(pacer.blocked_until(start + Duration::from_secs(3)), None);
    }
}
