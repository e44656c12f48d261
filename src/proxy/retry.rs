//! Retry decisions: which upstream outcomes are retried, which pause everyone (a throttle), how long to
//! back off (exponential, full jitter), and how to read `Retry-After` / `retry-after-ms`.
//! Pure functions, tested as tables.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::upstream::SendError;

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
}

impl RetryReason {
    pub const ALL: [RetryReason; 4] = [Self::Throttled, Self::Overloaded, Self::ServerError, Self::Connection];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server_error",
            Self::Connection => "connection",
        }
    }

    /// Throttles and overloads say something about the whole account: they start the shared cooldown.
    pub fn pauses_everyone(self) -> bool {
        matches!(self, Self::Throttled | Self::Overloaded)
    }
}

/// What to do with an attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Give the response to the client, whatever its status.
    Deliver,
    /// Try again (if the deadline allows), not before `retry_after` when the upstream named one.
    Retry { reason: RetryReason, retry_after: Option<Duration> },
    /// Stop: the client gets sluice's error for this outcome.
    Fail,
}

/// Classifies a response status. Statuses not in `on_status` are delivered as they are — 400, 401, 402
/// and 422 always (config validation keeps them out of `on_status`).
pub fn classify_status(status: StatusCode, headers: &HeaderMap, on_status: &[u16]) -> Decision {
    if !on_status.contains(&status.as_u16()) {
        return Decision::Deliver;
    }
    let reason = match status.as_u16() {
        429 => RetryReason::Throttled,
        503 => RetryReason::Overloaded,
        _ => RetryReason::ServerError,
    };
    Decision::Retry { reason, retry_after: retry_after(headers) }
}

/// Classifies a failure to get any response. A header timeout is not retried: the upstream may still be
/// working on (and billing) the request, and retrying a silent upstream only multiplies the wait.
pub fn classify_error(err: &SendError) -> Decision {
    match err {
        SendError::Connect(_) | SendError::Reset(_) => {
            Decision::Retry { reason: RetryReason::Connection, retry_after: None }
        }
        SendError::HeaderTimeout(_) => Decision::Fail,
    }
}

/// Full-jitter backoff before attempt `attempt + 1`: random in [0, min(max, base · 2^(attempt-1))].
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max);
    ceiling.mul_f64(fastrand::f64())
}

/// The upstream's requested wait: `retry-after-ms`, else `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const DEFAULT: [u16; 5] = [429, 500, 502, 503, 504];

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn status_table() {
        let none = HeaderMap::new();
        let cases = [
            (200, Decision::Deliver),
            (400, Decision::Deliver),
            (401, Decision::Deliver),
            (402, Decision::Deliver),
            (404, Decision::Deliver),
            (422, Decision::Deliver),
            (429, Decision::Retry { reason: RetryReason::Throttled, retry_after: None }),
            (500, Decision::Retry { reason: RetryReason::ServerError, retry_after: None }),
            (501, Decision::Deliver),
            (502, Decision::Retry { reason: RetryReason::ServerError, retry_after: None }),
            (503, Decision::Retry { reason: RetryReason::Overloaded, retry_after: None }),
            (504, Decision::Retry { reason: RetryReason::ServerError, retry_after: None }),
        ];
        for (status, expected) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify_status(status, &none, &DEFAULT), expected, "{status}");
        }
        assert_eq!(classify_status(StatusCode::BAD_GATEWAY, &none, &[429]), Decision::Deliver);
    }

    #[test]
    fn error_table() {
        assert!(matches!(
            classify_error(&SendError::Connect("refused".into())),
            Decision::Retry { reason: RetryReason::Connection, .. }
        ));
        assert!(matches!(classify_error(&SendError::Reset("reset".into())), Decision::Retry { .. }));
        assert_eq!(classify_error(&SendError::HeaderTimeout(Duration::from_secs(1))), Decision::Fail);
    }

    #[test]
    fn only_throttles_pause_everyone() {
        assert!(RetryReason::Throttled.pauses_everyone());
        assert!(RetryReason::Overloaded.pauses_everyone());
        assert!(!RetryReason::ServerError.pauses_everyone());
        assert!(!RetryReason::Connection.pauses_everyone());
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
