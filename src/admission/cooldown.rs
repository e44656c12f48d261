//! The shared cooldown: an upstream 429 (or 503) is a signal about the whole account, so dispatch of
//! everything pauses until the cooldown ends, then resumes at a jittered trickle instead of all at once.
//!
//! Length: the upstream's Retry-After when it sent one (capped by `retry.max_delay`), else
//! `base_delay · 2^(streak-1)` with equal jitter (half fixed, half random), where the streak counts
//! throttles that arrived *after* the previous cooldown ended — a burst of 429s from one overload
//! escalates once, not once per 429. A success resets the streak.
//! Resumption: for a window as long as the cooldown, dispatches are spaced by a random gap in
//! [0, 2·window/RAMP_STEPS], i.e. about RAMP_STEPS dispatches spread over the window; then full speed.

use std::time::Duration;

use tokio::time::Instant;

/// About how many dispatches the ramp after a cooldown spreads over its window.
pub const RAMP_STEPS: u32 = 20;

/// The cooldown state: a plain struct fed with events and the current time.
#[derive(Debug)]
pub struct Cooldown {
    base_delay: Duration,
    max_delay: Duration,
    /// Dispatch is paused until then.
    until: Option<Instant>,
    /// After `until`, dispatches are spaced until then.
    ramp_until: Option<Instant>,
    ramp_gap: Duration,
    /// The earliest time of the next dispatch while ramping.
    next_slot: Option<Instant>,
    /// Throttles in a row, each after the previous cooldown had ended.
    streak: u32,
    /// Time spent cooling down since start (for metrics).
    total: Duration,
}

impl Cooldown {
    pub fn new(base_delay: Duration, max_delay: Duration) -> Self {
        Self {
            base_delay,
            max_delay,
            until: None,
            ramp_until: None,
            ramp_gap: Duration::ZERO,
            next_slot: None,
            streak: 0,
            total: Duration::ZERO,
        }
    }

    /// Takes new delays (hot reload); a running cooldown keeps its end.
    pub fn set_delays(&mut self, base_delay: Duration, max_delay: Duration) {
        self.base_delay = base_delay;
        self.max_delay = max_delay;
    }

    /// The upstream throttled a request. Returns the cooldown's end when this started or extended one.
    pub fn throttled(&mut self, now: Instant, retry_after: Option<Duration>) -> Option<Instant> {
        let cooling = self.until.is_some_and(|until| now < until);
        if cooling && retry_after.is_none() {
            return None; // part of the same overload
        }
        let length = match retry_after {
            Some(wait) => wait.min(self.max_delay),
            None => {
                self.streak = self.streak.saturating_add(1);
                self.backoff()
            }
        };
        let until = now + length;
        if self.until.is_some_and(|current| current >= until) {
            return None;
        }
        let started = if cooling { self.until.unwrap_or(now) } else { now };
        self.total += until - started;
        self.until = Some(until);
        self.ramp_until = Some(until + length);
        self.ramp_gap = length * 2 / RAMP_STEPS;
        self.next_slot = None;
        Some(until)
    }

    /// A request succeeded: the account has room again.
    pub fn succeeded(&mut self) {
        self.streak = 0;
    }

    /// `None` when a dispatch may happen now, else the time to wait for.
    pub fn blocked_until(&self, now: Instant) -> Option<Instant> {
        if let Some(until) = self.until.filter(|until| now < *until) {
            return Some(until);
        }
        self.next_slot.filter(|slot| now < *slot)
    }

    /// A dispatch happened at `now`: while ramping, the next one waits a random gap.
    pub fn dispatched(&mut self, now: Instant) {
        match self.ramp_until {
            Some(ramp_until) if now < ramp_until => {
                let gap = self.ramp_gap.mul_f64(2.0 * fastrand::f64());
                self.next_slot = Some(now + gap);
            }
            _ => {
                self.ramp_until = None;
                self.next_slot = None;
            }
        }
    }

    /// Whether dispatch is paused right now.
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Time spent cooling down since start.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// `base · 2^(streak-1)` capped, with equal jitter: between half and all of it.
    fn backoff(&self) -> Duration {
        let exp = self.streak.saturating_sub(1).min(20);
        let full = self.base_delay.saturating_mul(1 << exp).min(self.max_delay);
        full / 2 + (full / 2).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn a_throttle_pauses_dispatch_for_about_the_base_delay() {
        let now = Instant::now();
        let mut cooldown = Cooldown::new(BASE, MAX);
        assert_eq!(cooldown.blocked_until(now), None);
        let until = cooldown.throttled(now, None).unwrap();
        assert!(until >= now + BASE / 2 && until <= now + BASE, "{:?}", until - now);
        assert_eq!(cooldown.blocked_until(now), Some(until));
        assert!(cooldown.active(now));
        assert!(!cooldown.active(until));
    }

    #[test]
    fn a_burst_of_throttles_is_one_cooldown() {
        let now = Instant::now();
        let mut cooldown = Cooldown::new(BASE, MAX);
        let until = cooldown.throttled(now, None).unwrap();
        for i in 1..50 {
            assert_eq!(cooldown.throttled(now + Duration::from_millis(i), None), None);
        }
        assert_eq!(cooldown.blocked_until(now), Some(until));
        assert_eq!(cooldown.streak, 1);
    }

    #[test]
    fn throttles_after_a_cooldown_escalate_and_success_resets() {
        let mut now = Instant::now();
        let mut cooldown = Cooldown::new(BASE, MAX);
        let mut lengths = vec![];
        for _ in 0..4 {
            let until = cooldown.throttled(now, None).unwrap();
            lengths.push(until - now);
            now = until;
        }
        // Equal jitter: attempt n lies in [base·2^n / 2, base·2^n].
        for (n, length) in lengths.iter().enumerate() {
            let full = BASE * (1 << n);
            assert!(*length >= full / 2 && *length <= full, "cooldown {n}: {length:?}");
        }
        cooldown.succeeded();
        let until = cooldown.throttled(now, None).unwrap();
        assert!(until - now <= BASE);
    }

    #[test]
    fn retry_after_sets_the_length_capped_by_max_delay() {
        let now = Instant::now();
        let mut cooldown = Cooldown::new(BASE, MAX);
        assert_eq!(cooldown.throttled(now, Some(Duration::from_secs(2))), Some(now + Duration::from_secs(2)));
        // A longer Retry-After during the cooldown extends it; the cap holds.
        assert_eq!(cooldown.throttled(now, Some(Duration::from_secs(60))), Some(now + MAX));
        assert_eq!(cooldown.total(), MAX);
    }

    #[test]
    fn resumption_is_spread_over_the_ramp() {
        let now = Instant::now();
        let mut cooldown = Cooldown::new(BASE, MAX);
        let until = cooldown.throttled(now, Some(Duration::from_secs(1))).unwrap();
        let mut at = until;
        let mut dispatched = 0;
        while at < until + Duration::from_secs(1) {
            if let Some(next) = cooldown.blocked_until(at) {
                assert!(next > at);
                at = next;
                continue;
            }
            cooldown.dispatched(at);
            dispatched += 1;
            at += Duration::from_micros(1);
        }
        // About RAMP_STEPS dispatches in the window, far from "all at once".
        assert!((5..=200).contains(&dispatched), "{dispatched} dispatches during the ramp");
        cooldown.dispatched(at);
        assert_eq!(cooldown.blocked_until(at), None, "full speed after the ramp");
    }
}
