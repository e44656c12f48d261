//! Proactive pacing of one lane from its upstream's rate-limit headers (OpenAI style; DeepSeek sends
//! none): `x-ratelimit-remaining-requests` / `x-ratelimit-reset-requests` and the `-tokens` pair. With R
//! requests left until the window resets in T, the lane's dispatches are spaced T/R apart until then, so
//! the window is not exhausted early; with none left (requests or tokens), the lane waits for the reset.
//! Every wait read from a header is capped (by `retry.max_delay`): a peer cannot stop a lane for an hour.
//! A plain struct fed with header values and the time.

use std::time::Duration;

use http::{HeaderMap, HeaderName};
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
        // Names made once: a lookup by `&str` would parse the name on every response.
        const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
        const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
        const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
        const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let window = Self {
            remaining_requests: text(&REMAINING_REQUESTS).and_then(|v| v.parse().ok()),
            reset_requests: text(&RESET_REQUESTS).and_then(parse_go_duration),
            remaining_tokens: text(&REMAINING_TOKENS).and_then(|v| v.parse().ok()),
            reset_tokens: text(&RESET_TOKENS).and_then(parse_go_duration),
        };
        (window != Self::default()).then_some(window)
    }
}

/// Longest duration read from a header before capping (beyond it the value is nonsense anyway).
const MAX_HEADER_SECONDS: f64 = 1e9;

/// A Go-style duration as OpenAI sends them: "1s", "6m0s", "12ms", "1h2m3.5s", "250us". Checked: an
/// overflowing, negative or non-finite value is `None`, never a panic.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = text.trim();
    if rest.is_empty() || rest.len() > 64 {
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
    (total.is_finite() && (0.0..=MAX_HEADER_SECONDS).contains(&total)).then(|| Duration::from_secs_f64(total))
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
    /// Takes what the latest response said; no wait longer than `max` is taken from it.
    pub fn observe(&mut self, now: Instant, window: Window, max: Duration) {
        let capped = |reset: Option<Duration>| reset.unwrap_or(Duration::from_secs(1)).min(max);
        let exhausted =
            [(window.remaining_requests, window.reset_requests), (window.remaining_tokens, window.reset_tokens)]
                .into_iter()
                .filter(|(remaining, _)| *remaining == Some(0))
                .map(|(_, reset)| capped(reset))
                .max();
        if let Some(reset) = exhausted {
            let until = now.checked_add(reset).unwrap_or(now);
            self.until = Some(self.until.map_or(until, |current| current.max(until)));
        }
        if let (Some(remaining), Some(reset)) = (window.remaining_requests, window.reset_requests) {
            if remaining > 0 {
                let reset = reset.min(max);
                let gap = reset / u32::try_from(remaining).unwrap_or(u32::MAX);
                self.gap = Some((gap, now.checked_add(reset).unwrap_or(now)));
            }
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

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn go_durations() {
        for (text, ms) in [("1s", 1000), ("6m0s", 360_000), ("12ms", 12), ("1h2m3.5s", 3_723_500), ("250us", 0)] {
            assert_eq!(parse_go_duration(text).map(|d| d.as_millis()), Some(ms), "{text}");
        }
        for bad in ["", "s", "5", "1d", "1.2.3s", "1e20s", "99999999999999999999h", "-1s", "NaNs"] {
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
            MAX,
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
            MAX,
        );
        assert_eq!(pacer.blocked_until(start), Some(start + Duration::from_millis(1500)));
        pacer.observe(
            start,
            Window { remaining_requests: Some(0), reset_requests: Some(Duration::from_secs(3)), ..Window::default() },
            MAX,
        );
        assert_eq!(pacer.blocked_until(start + Duration::from_secs(2)), Some(start + Duration::from_secs(3)));
        assert_eq!(pacer.blocked_until(start + Duration::from_secs(3)), None);
    }

    #[test]
    fn hostile_values_are_capped_and_never_divide_by_zero() {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        let hour = Some(Duration::from_secs(3600));
        pacer.observe(start, Window { remaining_tokens: Some(0), reset_tokens: hour, ..Window::default() }, MAX);
        assert_eq!(pacer.blocked_until(start), Some(start + MAX), "an hour asked, max_delay given");
        let mut pacer = Pacer::default();
        let huge = Window { remaining_requests: Some(u64::MAX), reset_requests: hour, ..Window::default() };
        pacer.observe(start, huge, MAX);
        pacer.dispatched(start);
        assert!(pacer.blocked_until(start).is_none_or(|at| at <= start + MAX));
        let headers = headers(&[
            ("x-ratelimit-remaining-requests", "18446744073709551616"),
            ("x-ratelimit-reset-requests", "1e308s"),
        ]);
        assert_eq!(Window::from_headers(&headers), None, "unparseable values are ignored");
    }
}
