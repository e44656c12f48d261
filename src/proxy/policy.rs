//! The one policy deciding what follows an upstream attempt — deliver, back to the queue, back off, or
//! give up — and what the attempt tells its lane. Pure functions of the attempt's outcome, the request's
//! progress and the time; tested as tables.
//!
//! - A throttle (429, or 503 "overloaded") goes straight back to the queue, at the front of its client's
//!   queue: the *lane* slows down (its learned limit, its probing gate), not the request, so the attempts a
//!   throttling upstream sees do not grow with the number of requests waiting.
//! - Another retried status (500, 502, 504 by default) or a failed connection also backs the request off
//!   on its own (full jitter, never less than a Retry-After), so one request that always fails cannot
//!   spin on its lane's successes; connection failures stop after `upstream.unreachable_wait`.
//! - A 401 or 402 on one of sluice's keys goes back to the queue: the key is set aside or the account
//!   paused (`upstream/accounts.rs`), and another key or account serves; when none can, admission says
//!   so and the client gets the upstream's own answer. With clients' own keys passed through, they are
//!   delivered as they are.
//! - Everything else is delivered; no response headers in time is a 504 (the upstream may still be working
//!   on, and billing, the request).

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use super::retry::{self, RetryReason};
use crate::admission::Signal;
use crate::upstream::SendError;

/// What an attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with this status, after `rtt`; `retry_after` as the upstream asked.
    Response { status: StatusCode, retry_after: Option<Duration>, rtt: Duration },
    /// No connection (refused, DNS, TLS): nothing reached the upstream.
    Connect,
    /// The connection failed after the request was (perhaps partly) sent, before any response byte.
    Reset,
    /// No response headers within `upstream.header_timeout`.
    HeaderTimeout,
}

impl Outcome {
    pub fn of_response(status: StatusCode, headers: &HeaderMap, rtt: Duration) -> Self {
        Self::Response { status, retry_after: retry::retry_after(headers), rtt }
    }

    pub fn of_error(err: &SendError) -> Self {
        match err {
            SendError::Connect(_) => Self::Connect,
            SendError::Reset(_) | SendError::BodyCut => Self::Reset,
            SendError::HeaderTimeout(_) => Self::HeaderTimeout,
        }
    }
}

/// What the request does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Give the response to the client, whatever its status.
    Deliver,
    /// Back into admission now, at the front of its client's queue; the lane decides when it goes.
    Requeue(RetryReason),
    /// Back into admission after waiting this long on its own.
    Backoff(RetryReason, Duration),
    /// Stop with sluice's own error.
    GiveUp(GiveUp),
}

/// Why a request stops with sluice's own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    HeaderTimeout,
    /// Connection failures for `upstream.unreachable_wait`.
    Unreachable,
    /// Its deadline (`queue.max_wait`) comes before the next attempt could.
    Deadline,
}

/// The request's situation when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub on_status: &'a [u16],
    /// The request went with one of sluice's keys (not the client's own).
    pub keyed: bool,
    /// Attempts made so far (this one included).
    pub attempts: u32,
    pub now: Instant,
    pub deadline: Instant,
    /// When its connection failures began (None: the last attempt connected).
    pub unreachable_since: Option<Instant>,
    pub unreachable_wait: Duration,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

/// What the attempt tells its lane (None: nothing — a header timeout proves nothing either way).
pub fn signal(outcome: Outcome, on_status: &[u16]) -> Option<Signal> {
    match outcome {
        Outcome::Response { status, retry_after, rtt } => Some(match retried(status, on_status) {
            Some(RetryReason::Throttled | RetryReason::Overloaded) => Signal::Throttled { retry_after },
            Some(_) => Signal::Failed { retry_after },
            None if status.is_success() => Signal::Accepted { rtt },
            None => Signal::Answered,
        }),
        Outcome::Connect | Outcome::Reset => Some(Signal::Failed { retry_after: None }),
        Outcome::HeaderTimeout => None,
    }
}

/// What an attempt on the primary tells its circuit (`circuit.rs`): `Some(true)` a failure (a retried 5xx,
/// no connection, no headers in time), `Some(false)` an answer (a 429 too: the primary is there, and its
/// lane handles the throttling).
pub fn circuit_failure(outcome: Outcome, on_status: &[u16]) -> Option<bool> {
    match outcome {
        Outcome::Response { status, .. } => Some(status.is_server_error() && on_status.contains(&status.as_u16())),
        Outcome::Connect | Outcome::Reset | Outcome::HeaderTimeout => Some(true),
    }
}

/// What the request does after `outcome`.
pub fn decide(outcome: Outcome, situation: &Situation<'_>) -> Verdict {
    let (reason, retry_after) = match outcome {
        Outcome::Response { status, .. } if situation.keyed && status == StatusCode::UNAUTHORIZED => {
            return Verdict::Requeue(RetryReason::KeyRefused);
        }
        Outcome::Response { status, .. } if situation.keyed && status == StatusCode::PAYMENT_REQUIRED => {
            return Verdict::Requeue(RetryReason::OutOfBalance);
        }
        Outcome::Response { status, retry_after, .. } => match retried(status, situation.on_status) {
            None => return Verdict::Deliver,
            Some(reason) => (reason, retry_after),
        },
        Outcome::HeaderTimeout => return Verdict::GiveUp(GiveUp::HeaderTimeout),
        Outcome::Connect => {
            let since = situation.unreachable_since.unwrap_or(situation.now);
            if situation.now.saturating_duration_since(since) >= situation.unreachable_wait {
                return Verdict::GiveUp(GiveUp::Unreachable);
            }
            (RetryReason::Connection, None)
        }
        Outcome::Reset => (RetryReason::Connection, None),
    };
    if matches!(reason, RetryReason::Throttled | RetryReason::Overloaded) {
        return if situation.now >= situation.deadline {
            Verdict::GiveUp(GiveUp::Deadline)
        } else {
            Verdict::Requeue(reason)
        };
    }
    let floor = retry_after.unwrap_or_default().min(situation.max_delay);
    let delay = retry::backoff(situation.attempts, situation.base_delay, situation.max_delay).max(floor);
    let at = situation.now.checked_add(delay).unwrap_or(situation.deadline);
    if at >= situation.deadline {
        return Verdict::GiveUp(GiveUp::Deadline);
    }
    Verdict::Backoff(reason, delay)
}

/// Why a status is retried, if it is (`on_status`; 400, 401, 402 and 422 never are).
fn retried(status: StatusCode, on_status: &[u16]) -> Option<RetryReason> {
    if !on_status.contains(&status.as_u16()) {
        return None;
    }
    Some(match status.as_u16() {
        429 => RetryReason::Throttled,
        503 => RetryReason::Overloaded,
        _ => RetryReason::ServerError,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: [u16; 5] = [429, 500, 502, 503, 504];
    const RTT: Duration = Duration::from_millis(5);

    fn situation(now: Instant) -> Situation<'static> {
        Situation {
            on_status: &DEFAULT,
            keyed: true,
            attempts: 1,
            now,
            deadline: now + Duration::from_secs(300),
            unreachable_since: None,
            unreachable_wait: Duration::from_secs(30),
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }

    fn response(status: u16) -> Outcome {
        Outcome::Response { status: StatusCode::from_u16(status).unwrap(), retry_after: None, rtt: RTT }
    }

    #[test]
    fn verdicts() {
        let now = Instant::now();
        let s = situation(now);
        for status in [200, 201, 400, 404, 422, 501] {
            assert_eq!(decide(response(status), &s), Verdict::Deliver, "{status}");
        }
        assert_eq!(decide(response(401), &s), Verdict::Requeue(RetryReason::KeyRefused));
        assert_eq!(decide(response(402), &s), Verdict::Requeue(RetryReason::OutOfBalance));
        let passed_through = Situation { keyed: false, ..s };
        for status in [401, 402] {
            assert_eq!(decide(response(status), &passed_through), Verdict::Deliver, "the client's own key: {status}");
        }
        assert_eq!(decide(response(429), &s), Verdict::Requeue(RetryReason::Throttled));
        assert_eq!(decide(response(503), &s), Verdict::Requeue(RetryReason::Overloaded));
        for status in [500, 502, 504] {
            assert!(matches!(decide(response(status), &s), Verdict::Backoff(RetryReason::ServerError, _)), "{status}");
        }
        assert!(matches!(decide(Outcome::Reset, &s), Verdict::Backoff(RetryReason::Connection, _)));
        assert!(matches!(decide(Outcome::Connect, &s), Verdict::Backoff(RetryReason::Connection, _)));
        assert_eq!(decide(Outcome::HeaderTimeout, &s), Verdict::GiveUp(GiveUp::HeaderTimeout));
        let narrow = Situation { on_status: &[429], ..s };
        assert_eq!(decide(response(502), &narrow), Verdict::Deliver);
    }

    #[test]
    fn connection_failures_give_up_after_the_unreachable_wait() {
        let now = Instant::now();
        let s = Situation { unreachable_since: Some(now - Duration::from_secs(29)), ..situation(now) };
        assert!(matches!(decide(Outcome::Connect, &s), Verdict::Backoff(..)));
        let s = Situation { unreachable_since: Some(now - Duration::from_secs(30)), ..situation(now) };
        assert_eq!(decide(Outcome::Connect, &s), Verdict::GiveUp(GiveUp::Unreachable));
    }

    #[test]
    fn the_deadline_bounds_every_retry() {
        let now = Instant::now();
        let s = Situation { deadline: now, ..situation(now) };
        assert_eq!(decide(response(429), &s), Verdict::GiveUp(GiveUp::Deadline));
        let s = Situation { deadline: now + Duration::from_millis(1), attempts: 20, ..situation(now) };
        let retry_after = Some(Duration::from_secs(5));
        let outcome = Outcome::Response { status: StatusCode::BAD_GATEWAY, retry_after, rtt: RTT };
        assert_eq!(decide(outcome, &s), Verdict::GiveUp(GiveUp::Deadline));
    }

    #[test]
    fn a_server_errors_retry_after_is_a_floor_capped_by_max_delay() {
        let now = Instant::now();
        let s = situation(now);
        let ask = |secs| Outcome::Response {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            retry_after: Some(Duration::from_secs(secs)),
            rtt: RTT,
        };
        assert!(matches!(decide(ask(20), &s), Verdict::Backoff(_, d) if d >= Duration::from_secs(20)));
        assert!(matches!(decide(ask(3600), &s), Verdict::Backoff(_, d) if d == Duration::from_secs(30)));
    }

    #[test]
    fn what_the_lane_learns() {
        assert_eq!(signal(response(200), &DEFAULT), Some(Signal::Accepted { rtt: RTT }));
        assert_eq!(signal(response(400), &DEFAULT), Some(Signal::Answered));
        assert_eq!(signal(response(429), &DEFAULT), Some(Signal::Throttled { retry_after: None }));
        assert_eq!(signal(response(503), &DEFAULT), Some(Signal::Throttled { retry_after: None }));
        assert_eq!(signal(response(502), &DEFAULT), Some(Signal::Failed { retry_after: None }));
        assert_eq!(signal(Outcome::Connect, &DEFAULT), Some(Signal::Failed { retry_after: None }));
        assert_eq!(signal(Outcome::HeaderTimeout, &DEFAULT), None);
        assert_eq!(signal(response(502), &[429]), Some(Signal::Answered), "not retried: delivered as is");
    }
}
