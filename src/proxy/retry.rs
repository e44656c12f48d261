//! The pieces of a retry: why an attempt is retried (a bounded label), how long a request backs off
//! (exponential, full jitter), and how to read `Retry-After` / `retry-after-ms` — checked, so no header
//! value can panic. Pure functions, tested as tables; `policy.rs` puts them together.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Why an attempt is retried (a bounded label for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// 429: the account's rate or concurrency limit.
    Throttled,
    /// 503: the provider is overloaded.
    Overloaded,
    /// Another configured status (500, 502, 504, …).
    ServerError,
    /// No connection, or it broke before any response byte.
    Connection,
    /// 401 on one of sluice's keys: the key is set aside, another key or account serves.
    KeyRefused,
    /// 402: the account is out of balance and paused; another account serves.
    OutOfBalance,
}

impl RetryReason {
    pub const ALL: [RetryReason; 6] =
        [Self::Throttled, Self::Overloaded, Self::ServerError, Self::Connection, Self::KeyRefused, Self::OutOfBalance];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server_error",
            Self::Connection => "connection",
            Self::KeyRefused => "key_refused",
            Self::OutOfBalance => "out_of_balance",
        }
    }
}

/// Full-jitter backoff before attempt `attempt + 1`: random in [0, min(max, base · 2^(attempt-1))].
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max);
    ceiling.mul_f64(fastrand::f64())
}

/// The upstream's requested wait: `retry-after-ms`, else `Retry-After` in seconds or as an HTTP date.
/// Negative or unreadable values are none; absurdly large ones saturate (callers cap them).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return seconds(ms / 1000.0);
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// A non-negative, non-NaN number of seconds as a duration, saturating instead of panicking.
fn seconds(value: f64) -> Option<Duration> {
    if value.is_nan() || value < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "0.5")])), Some(Duration::from_millis(500)));
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500"), ("retry-after", "9")])),
            Some(Duration::from_millis(1500)),
            "retry-after-ms wins"
        );
        let in_ten = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(10));
        let parsed = retry_after(&headers(&[("retry-after", &in_ten)])).unwrap();
        assert!(parsed > Duration::from_secs(8) && parsed <= Duration::from_secs(10), "{parsed:?}");
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(100));
        assert_eq!(retry_after(&headers(&[("retry-after", &past)])), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn hostile_retry_after_values_never_panic() {
        for value in ["1e20", "1e308", "inf", "-inf", "NaN", "-0", "18446744073709551616", "0x10", "", " 5 "] {
            let got = retry_after(&headers(&[("retry-after", value)]));
            let got_ms = retry_after(&headers(&[("retry-after-ms", value)]));
            for wait in [got, got_ms].into_iter().flatten() {
                assert!(wait <= Duration::MAX, "{value}");
            }
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "1e20")])), Some(Duration::MAX));
        assert_eq!(retry_after(&headers(&[("retry-after", "NaN")])), None);
        // Random bytes and numbers: never a panic.
        for _ in 0..2000 {
            let text: String = (0..fastrand::usize(0..24))
                .map(|_| {
                    ['0', '1', '9', '.', 'e', 'E', '-', '+', ' ', 'x', 'n', 'a', 'N', 'i', 'f'][fastrand::usize(0..15)]
                })
                .collect();
            let _ = retry_after(&headers(&[("retry-after", &text), ("retry-after-ms", &text)]));
            let number = format!("{}", f64::from_bits(fastrand::u64(..)));
            let _ = retry_after(&headers(&[("retry-after", &number)]));
            let _ = retry_after(&headers(&[("retry-after-ms", &number)]));
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let base = Duration::from_millis(250);
        let max = Duration::from_secs(30);
        for attempt in 1..=12 {
            let ceiling = (base * (1 << (attempt - 1))).min(max);
            for _ in 0..50 {
                let delay = backoff(attempt, base, max);
                assert!(delay <= ceiling, "attempt {attempt}: {delay:?} > {ceiling:?}");
            }
        }
        let spread: Vec<Duration> = (0..50).map(|_| backoff(5, base, max)).collect();
        assert!(spread.iter().any(|d| *d != spread[0]), "jittered");
        assert!(backoff(100, base, max) <= max);
    }
}
