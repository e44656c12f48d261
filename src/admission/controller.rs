//! The learned concurrency limit of one lane (account × model): a plain struct fed with events — an
//! attempt dispatched, accepted (2xx headers), throttled (429/503), its slot released — and the time.
//!
//! - **Start modest, grow fast** (slow start): a lane begins at `INITIAL_LIMIT` and grows by one per
//!   accepted attempt while the limit is in use (it doubles per round trip), until the first throttle.
//! - **Decrease to what the upstream holds**: a throttle lowers the limit to the lane's other attempts
//!   in flight (`in_flight − 1`): the upstream just said it takes no more than it already has. Each
//!   further throttle of the same wave lowers it by one more, so it converges in one step, not in
//!   a hundred ×0.95 windows. A throttled probe (see `probe.rs`) changes nothing: the gate handles it.
//! - **Only for our own load** (`evidence.rs`): when, after a decrease, attempts keep being throttled at
//!   a concurrency where others sent meanwhile get through, lowering the limit did not lower the
//!   throttling: the descent is called off, the limit restored to where it began, and for `SUSPEND`
//!   throttles no longer lower it (the lane's gate still slows them down, as with fixed limits) while
//!   growth stays within a quarter of the concurrency the upstream was seen to accept.
//! - **Grow carefully near a known limit**: after a throttle, the limit grows again only after `PLATEAU`
//!   calm windows in which it was used (in flight ≥ half of it) and response times stayed under
//!   `LATENCY_GUARD` × their baseline (or within `LATENCY_SLACK` of it); then by one per calm window, one
//!   more for every `CALM_STEP` calm windows in a row. The window is the smoothed time an accepted attempt
//!   holds its slot, within [`MIN_WINDOW`, `MAX_WINDOW`].
//! - **Recover fast**: when the lane had to probe (nothing of ours was accepted) and then a probe is
//!   accepted, the limit slow-starts back to where it was before the throttling began.
//! - **Learned limits last**: nothing is forgotten when the lane goes quiet. After `IDLE_STEP` or more of
//!   idleness, the first dispatch raises a learned limit by one per `IDLE_STEP` idle, at most to twice
//!   its value and never above the ceiling — slowly back towards the cap, never a jump to it.

use std::time::Duration;

use tokio::time::Instant;

use super::evidence::{Attempt, Evidence};

/// Where a fresh lane starts.
pub const INITIAL_LIMIT: usize = 8;
/// Calm windows after a throttle before the limit grows above where it settled.
pub const PLATEAU: u32 = 8;
/// Every this many calm windows in a row past the plateau, the increase grows by one.
pub const CALM_STEP: u32 = 4;
/// No growth while the smoothed round trip is above this multiple of the lowest seen…
pub const LATENCY_GUARD: f64 = 2.0;
/// …and more than this above it (millisecond round trips jitter by more than 2×).
pub const LATENCY_SLACK: Duration = Duration::from_millis(10);
pub const MIN_WINDOW: Duration = Duration::from_millis(20);
pub const MAX_WINDOW: Duration = Duration::from_secs(10);
/// How long throttling judged load-independent stops lowering the limit.
pub const SUSPEND: Duration = Duration::from_secs(60);
/// Idleness that earns a learned limit one step back towards its ceiling.
pub const IDLE_STEP: Duration = Duration::from_secs(60);
/// Weight of a new sample in the smoothed hold and round-trip times.
const SMOOTHING: f64 = 0.2;

/// A change worth telling about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Decreased {
        from: usize,
        to: usize,
    },
    Increased {
        to: usize,
    },
    /// A descent was called off: the throttling was not caused by this lane's load.
    Restored {
        to: usize,
    },
}

/// Throttles in a row: from the first until an attempt dispatched after it is accepted.
#[derive(Debug, Clone, Copy)]
struct Streak {
    /// The limit before the streak began: where recovery returns to.
    target: usize,
    /// Attempts with a sequence number from here on were dispatched after the streak began.
    from_seq: u64,
    /// The lane had to probe during the streak (nothing of ours was being accepted).
    probed: bool,
}

#[derive(Debug, Clone)]
pub struct Controller {
    limit: usize,
    floor: usize,
    ceiling: usize,
    /// Below it the limit grows per accepted attempt (slow start); None until the first throttle.
    ssthresh: Option<usize>,
    /// Smoothed slot hold time of accepted attempts: the window.
    hold: Option<Duration>,
    /// Smoothed time to response headers, and the lowest seen: the latency guard.
    rtt: Option<Duration>,
    rtt_baseline: Option<Duration>,
    window_start: Instant,
    throttled_in_window: bool,
    peak_inflight: usize,
    /// Calm windows since the last throttle.
    calm: u32,
    /// Whether throttles came from our load (see `evidence.rs`).
    evidence: Evidence,
    /// The limit when the current descent began.
    descent_start: Option<usize>,
    /// Until then, throttles are judged load-independent and lower nothing.
    suspended_until: Option<Instant>,
    /// The limit restored when throttles were judged load-independent.
    suspended_from: usize,
    /// The highest concurrency an accepted attempt met since then.
    peak_accepted: usize,
    streak: Option<Streak>,
    /// The last time anything of this lane was dispatched or came back.
    last_active: Instant,
}

impl Controller {
    pub fn new(floor: usize, ceiling: usize, now: Instant) -> Self {
        let ceiling = ceiling.max(1);
        let floor = floor.clamp(1, ceiling);
        Self {
            limit: INITIAL_LIMIT.clamp(floor, ceiling),
            floor,
            ceiling,
            ssthresh: None,
            hold: None,
            rtt: None,
            rtt_baseline: None,
            window_start: now,
            throttled_in_window: false,
            peak_inflight: 0,
            calm: 0,
            evidence: Evidence::default(),
            descent_start: None,
            suspended_until: None,
            suspended_from: 0,
            peak_accepted: 0,
            streak: None,
            last_active: now,
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// Still growing per accepted attempt (no throttle yet, or recovering).
    pub fn slow_start(&self) -> bool {
        self.ssthresh.is_none_or(|threshold| self.limit < threshold)
    }

    /// New bounds (hot reload); the learned limit is kept inside them. A limit held down only by the old
    /// ceiling, with nothing learned yet, takes the start a fresh lane would have.
    pub fn set_bounds(&mut self, floor: usize, ceiling: usize) {
        if self.limit >= self.ceiling && self.ssthresh.is_none() {
            self.limit = self.limit.max(INITIAL_LIMIT);
        }
        self.ceiling = ceiling.max(1);
        self.floor = floor.clamp(1, self.ceiling);
        self.limit = self.limit.clamp(self.floor, self.ceiling);
    }

    fn window(&self) -> Duration {
        self.hold.unwrap_or(MIN_WINDOW * 5).clamp(MIN_WINDOW, MAX_WINDOW)
    }

    /// An attempt was dispatched; `inflight` counts it. After a long idle period, a learned limit takes
    /// its idle steps back towards the ceiling.
    pub fn dispatched(&mut self, now: Instant, inflight: usize) -> Option<Change> {
        let idle = now.saturating_duration_since(self.last_active);
        self.last_active = now;
        if inflight != 1 || idle < IDLE_STEP || self.slow_start() || self.limit >= self.ceiling {
            return None;
        }
        let steps = usize::try_from(idle.as_secs() / IDLE_STEP.as_secs()).unwrap_or(usize::MAX);
        self.grow_to(self.limit.saturating_add(steps.min(self.limit)));
        self.ssthresh = Some(self.limit);
        Some(Change::Increased { to: self.limit })
    }

    /// The throttle count to stamp on a new dispatch.
    pub fn throttle_count(&self) -> u64 {
        self.evidence.count()
    }

    /// `attempt` was accepted after `rtt`; `inflight` attempts of the lane are in flight now (it included).
    pub fn accepted(&mut self, now: Instant, attempt: Attempt, inflight: usize, rtt: Duration) -> Option<Change> {
        let seq = attempt.seq;
        self.last_active = now;
        self.rtt = Some(smooth(self.rtt, rtt));
        self.rtt_baseline = Some(self.rtt_baseline.map_or(rtt, |base| base.min(rtt)));
        self.peak_inflight = self.peak_inflight.max(inflight);
        self.evidence.accepted(attempt);
        self.peak_accepted = self.peak_accepted.max(attempt.level);
        // An attempt dispatched after the streak began got through: the streak is over. If the lane had
        // to probe, recover towards where the limit was before.
        if let Some(streak) = self.streak.filter(|s| seq >= s.from_seq) {
            self.streak = None;
            if streak.probed && streak.target > self.limit {
                self.ssthresh = Some(streak.target.min(self.ceiling));
            }
        }
        if self.slow_start() && inflight * 2 >= self.limit && self.limit < self.growth_bound(now) {
            self.grow_to(self.limit + 1);
            return Some(Change::Increased { to: self.limit });
        }
        if now.saturating_duration_since(self.window_start) < self.window() {
            return None;
        }
        // The end of a window: grow if it was calm, used, and not slow.
        let used = self.peak_inflight * 2 >= self.limit;
        let quick = match (self.rtt, self.rtt_baseline) {
            (Some(rtt), Some(base)) => {
                rtt.as_secs_f64() <= base.as_secs_f64() * LATENCY_GUARD || rtt <= base + LATENCY_SLACK
            }
            _ => true,
        };
        let calm = used && quick && !self.throttled_in_window;
        self.window_start = now;
        self.throttled_in_window = false;
        self.peak_inflight = inflight;
        if !calm || self.limit >= self.ceiling {
            return None;
        }
        self.calm = self.calm.saturating_add(1);
        if self.calm < PLATEAU {
            return None;
        }
        let step = 1 + usize::try_from((self.calm - PLATEAU) / CALM_STEP).unwrap_or(0);
        self.grow_to(self.limit.saturating_add(step));
        Some(Change::Increased { to: self.limit })
    }

    /// `attempt` was throttled while `inflight` were in flight (it included). `next_seq` is the number
    /// the next dispatch will get.
    pub fn throttled(&mut self, now: Instant, attempt: Attempt, inflight: usize, next_seq: u64) -> Option<Change> {
        self.last_active = now;
        let began = self.descent_start.unwrap_or(self.limit);
        let not_ours = self.evidence.throttled(attempt, began - began / 4);
        if self.suspended(now) {
            return None; // judged not our load: the lane's gate slows this retry down instead
        }
        if not_ours {
            return self.call_off_descent(now);
        }
        self.throttled_in_window = true;
        self.calm = 0;
        self.streak.get_or_insert(Streak { target: self.limit, from_seq: next_seq, probed: false });
        let from = self.limit;
        let to = inflight.saturating_sub(1).min(from).max(self.floor);
        self.ssthresh = Some(to);
        if to >= from {
            return None;
        }
        self.descent_start.get_or_insert(from);
        self.evidence.decreased(next_seq);
        self.limit = to;
        Some(Change::Decreased { from, to })
    }

    /// How high slow start may take the limit now: the ceiling, except while throttles are judged not
    /// ours — then a quarter above the highest concurrency recently accepted, so that a wrong judgement
    /// cannot grow the limit far past what the upstream takes.
    fn growth_bound(&self, now: Instant) -> usize {
        if !self.suspended(now) {
            return self.ceiling;
        }
        let proven = self.peak_accepted.max(self.suspended_from);
        proven.saturating_add(proven / 4 + 2).min(self.ceiling)
    }

    /// Whether throttles are currently judged load-independent.
    pub fn suspended(&self, now: Instant) -> bool {
        self.suspended_until.is_some_and(|until| now < until)
    }

    /// Lowering the limit did not lower the throttling: restore it, grow per acceptance again, and let
    /// throttles lower nothing for `SUSPEND`.
    fn call_off_descent(&mut self, now: Instant) -> Option<Change> {
        self.suspended_until = now.checked_add(SUSPEND);
        self.peak_accepted = 0;
        self.suspended_from = self.descent_start.unwrap_or(self.limit).max(self.limit);
        self.ssthresh = None;
        self.throttled_in_window = false;
        self.streak = None;
        let restored = self.descent_start.take().unwrap_or(self.limit).max(self.limit).min(self.ceiling);
        self.grow_to(restored);
        Some(Change::Restored { to: self.limit })
    }

    /// Raises the limit (within the ceiling); growth ends the current descent.
    fn grow_to(&mut self, limit: usize) {
        self.limit = limit.min(self.ceiling).max(self.limit);
        self.descent_start = None;
        self.evidence.end_descent();
    }

    /// The lane's gate began probing: none of its attempts are being accepted.
    pub fn probing(&mut self) {
        if let Some(streak) = &mut self.streak {
            streak.probed = true;
        }
    }

    /// A slot came back; `hold` is how long an accepted attempt held it (the window's sample).
    pub fn released(&mut self, now: Instant, hold: Option<Duration>) {
        self.last_active = now;
        if let Some(hold) = hold {
            self.hold = Some(smooth(self.hold, hold));
        }
    }
}

/// An exponentially weighted moving average step.
fn smooth(average: Option<Duration>, sample: Duration) -> Duration {
    match average {
        Some(average) => average.mul_f64(1.0 - SMOOTHING) + sample.mul_f64(SMOOTHING),
        None => sample,
    }
}

#[cfg(test)]
mod tests;
