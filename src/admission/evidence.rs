//! Whether throttles come from our own load: the gradient check the learned limit (`controller.rs`)
//! applies while it lowers a lane's limit.
//!
//! Lowering the limit is only right if it lowers the throttling. Each decrease opens a *window*: the
//! attempts dispatched until the next one. Under a hard concurrency cap, a window's attempts meet a
//! lower concurrency and get through — or, while the capacity is still below the limit, each is throttled
//! and the limit steps down again. Under load-independent throttling (an upstream that answers 429 to a
//! share of requests whatever the load) a window keeps mixing both at the same concurrency. So a throttle
//! is judged *not ours* when the attempts of its window at or below its concurrency number at least
//! `MIN_SAMPLES`, some of them were accepted, and at least `NOT_OURS_SHARE` were throttled — and when
//! it met a concurrency well below where the descent began (an upstream frees a slot a moment after
//! sluice sees a response end, so close to the limit a throttle now and then is only a race).
//!
//! Concurrency here is the *effective level*: the lane's in-flight count when the attempt went out, less
//! the throttles answered since (those attempts were counted in flight, but the upstream never held
//! them). A plain struct fed with events.

/// Attempts of a window at or below a throttle's concurrency needed to judge it.
pub const MIN_SAMPLES: usize = 5;
/// Share of those throttled from which the throttling is judged load-independent.
pub const NOT_OURS_SHARE: f64 = 0.1;
/// Outcomes remembered per window.
const REMEMBERED: usize = 64;

/// One attempt as the evidence sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The lane's sequence number of the dispatch.
    pub seq: u64,
    /// The lane's in-flight count with this attempt, at dispatch.
    pub level: usize,
    /// The lane's throttle count at dispatch.
    pub throttles_before: u64,
}

/// The attempts dispatched since the latest decrease, and what became of them.
#[derive(Debug, Clone, Default)]
struct Window {
    from_seq: u64,
    outcomes: Vec<(Attempt, bool)>,
}

#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Throttles seen so far.
    count: u64,
    /// The window of the current descent (none: the limit has not come down since it last grew).
    window: Option<Window>,
}

impl Evidence {
    /// The throttle count, for stamping a new dispatch.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn effective(&self, attempt: &Attempt) -> usize {
        let since = usize::try_from(self.count.saturating_sub(attempt.throttles_before)).unwrap_or(usize::MAX);
        attempt.level.saturating_sub(since).max(1)
    }

    /// A throttle of `attempt` arrived. Returns true when it is judged not to come from our load; only a
    /// throttle at or below `judged_below` (a concurrency well under where the descent began) can be.
    pub fn throttled(&mut self, attempt: Attempt, judged_below: usize) -> bool {
        let level = self.effective(&attempt);
        let not_ours = self.window.as_ref().is_some_and(|window| {
            if attempt.seq < window.from_seq || level > judged_below {
                return false; // sent before the latest decrease (part of what caused it), or too close to call
            }
            let (mut samples, mut throttled) = (1, 1);
            for (other, was_throttled) in &window.outcomes {
                if self.effective(other) <= level {
                    samples += 1;
                    throttled += usize::from(*was_throttled);
                }
            }
            samples >= MIN_SAMPLES && throttled < samples && throttled as f64 >= NOT_OURS_SHARE * samples as f64
        });
        self.count += 1;
        self.record(attempt, true);
        not_ours
    }

    /// `attempt` was accepted.
    pub fn accepted(&mut self, attempt: Attempt) {
        self.record(attempt, false);
    }

    fn record(&mut self, attempt: Attempt, throttled: bool) {
        if let Some(window) = self.window.as_mut().filter(|w| attempt.seq >= w.from_seq) {
            if window.outcomes.len() == REMEMBERED {
                window.outcomes.remove(0);
            }
            window.outcomes.push((attempt, throttled));
        }
    }

    /// The limit came down; `next_seq` numbers the next dispatch, which opens a new window.
    pub fn decreased(&mut self, next_seq: u64) {
        self.window = Some(Window { from_seq: next_seq, outcomes: Vec::new() });
    }

    /// The limit grew again (or the throttling was judged not ours): no window until the next decrease.
    pub fn end_descent(&mut self) {
        self.window = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(seq: u64, level: usize, throttles_before: u64) -> Attempt {
        Attempt { seq, level, throttles_before }
    }

    #[test]
    fn throttling_that_goes_on_where_attempts_get_through_is_not_ours() {
        let mut evidence = Evidence::default();
        assert!(!evidence.throttled(attempt(7, 8, 0), 6), "no window yet");
        evidence.decreased(8);
        // After the decrease, at concurrency 1: accepted, accepted, throttled, accepted, ...
        let mut judged = vec![];
        for seq in 8..20 {
            if seq % 3 == 1 {
                judged.push(evidence.throttled(attempt(seq, 1, evidence.count()), 6));
            } else {
                evidence.accepted(attempt(seq, 1, evidence.count()));
            }
        }
        assert_eq!(judged.first(), Some(&false), "too few samples at first");
        assert!(judged.iter().any(|j| *j), "{judged:?}");
    }

    #[test]
    fn near_where_the_descent_began_nothing_is_judged() {
        let mut evidence = Evidence::default();
        evidence.decreased(0);
        for seq in 0..20 {
            evidence.accepted(attempt(seq, 7, evidence.count()));
            assert!(!evidence.throttled(attempt(100 + seq, 7, evidence.count()), 6), "a race near the limit");
        }
    }

    #[test]
    fn a_walk_down_to_a_lower_cap_is_ours() {
        // Capacity fell from 40 to 10: each window's attempt is throttled until the limit is below 10.
        let mut evidence = Evidence::default();
        for (count, level) in (11..=40).rev().enumerate() {
            let count = count as u64;
            let seq = 100 + count;
            assert!(!evidence.throttled(attempt(seq, level, count), 30), "{level}");
            evidence.decreased(seq + 1);
        }
    }

    #[test]
    fn a_throttle_above_where_a_window_gets_through_is_ours() {
        // At a hard cap of 8, after settling: accepted at 8, throttled at 9 (a probe above the cap).
        let mut evidence = Evidence::default();
        evidence.decreased(0);
        for seq in 0..40 {
            evidence.accepted(attempt(seq, 8, 0));
        }
        assert!(!evidence.throttled(attempt(40, 9, 0), 100));
        // Attempts counted in flight but throttled do not raise another's level.
        evidence.accepted(attempt(42, 9, 0)); // sent while 41, throttled below, was counted
        assert!(!evidence.throttled(attempt(41, 9, 1), 100));
    }
}
