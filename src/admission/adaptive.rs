//! The adaptive concurrency limit of one lane (model): AIMD, a plain struct fed with events and the time.
//! - Decrease: on a 429 (or 503), `limit = max(floor, min(limit, in_flight) · DECREASE)` (0.95), at most once
//!   per window, so a burst of 429s from one overload is one decrease. Scaling from what was actually in
//!   flight makes a limit that starts far above the hidden capacity converge in a few windows.
//! - Increase: at the end of a window with no throttle in it, in which the limit was actually used
//!   (peak in-flight ≥ half the limit) and the smoothed round trip is under `LATENCY_GUARD` × its
//!   baseline (or within `LATENCY_SLACK` of it): `limit += 1 + calm / CALM_STEP`, where `calm` counts
//!   such windows in a row since the last throttle — +1 while probing near the capacity, faster when
//!   the capacity has grown — up to the ceiling (the configured cap).
//! - The window is the smoothed time a successful attempt holds its slot (dispatch to the end of its
//!   response body — how DeepSeek counts), within [`MIN_WINDOW`, `MAX_WINDOW`]: a change shows its
//!   effect within about one window. The latency guard uses the time to response headers.

use std::time::Duration;

use tokio::time::Instant;

/// Multiplicative decrease on a throttle. Gentler than the classic 0.9: measured with the simulator
/// (BENCHMARKS.md), 0.9 left about 5 % of a stable capacity unused in its sawtooth, 0.95 about 3 %, at
/// the same share of 429s.
pub const DECREASE: f64 = 0.95;
/// No increase while the smoothed round trip is above this multiple of the lowest seen…
pub const LATENCY_GUARD: f64 = 2.0;
/// …and more than this above it (millisecond round trips jitter by more than 2×).
pub const LATENCY_SLACK: Duration = Duration::from_millis(10);
pub const MIN_WINDOW: Duration = Duration::from_millis(20);
pub const MAX_WINDOW: Duration = Duration::from_secs(10);
/// Every this many calm windows in a row, the increase grows by one.
pub const CALM_STEP: u32 = 4;
/// Weight of a new round-trip sample in the smoothed value.
const SMOOTHING: f64 = 0.2;

/// A change worth telling about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Decreased { from: usize, to: usize },
    Increased { to: usize },
}

#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    floor: usize,
    ceiling: usize,
    /// Smoothed slot hold time of successful attempts: the window.
    hold: Option<Duration>,
    /// Smoothed time to response headers, and the lowest seen: the latency guard.
    rtt: Option<Duration>,
    rtt_baseline: Option<Duration>,
    window_start: Instant,
    throttled_in_window: bool,
    peak_inflight: usize,
    last_decrease: Option<Instant>,
    /// Windows in a row that ended with an increase.
    calm: u32,
}

impl Aimd {
    /// Starts at the ceiling: until the upstream says otherwise, the configured cap holds.
    pub fn new(floor: usize, ceiling: usize, now: Instant) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            limit: ceiling as f64,
            floor: floor.clamp(1, ceiling),
            ceiling,
            hold: None,
            rtt: None,
            rtt_baseline: None,
            window_start: now,
            throttled_in_window: false,
            peak_inflight: 0,
            last_decrease: None,
            calm: 0,
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(self.floor, self.ceiling)
    }

    /// New bounds (hot reload); the limit is kept inside them, and a limit that was at its ceiling
    /// (nothing learned below it) follows the new ceiling.
    pub fn set_bounds(&mut self, floor: usize, ceiling: usize) {
        if self.limit() >= self.ceiling {
            self.limit = ceiling as f64;
        }
        self.ceiling = ceiling.max(1);
        self.floor = floor.clamp(1, self.ceiling);
        self.limit = self.limit.clamp(self.floor as f64, self.ceiling as f64);
    }

    fn window(&self) -> Duration {
        self.hold.unwrap_or(MIN_WINDOW * 5).clamp(MIN_WINDOW, MAX_WINDOW)
    }

    /// A successful attempt gave its slot back after holding it for `hold`.
    pub fn released(&mut self, hold: Duration) {
        self.hold = Some(smooth(self.hold, hold));
    }

    /// The upstream throttled a request while `inflight` were in flight on this lane (that one included).
    pub fn throttled(&mut self, now: Instant, inflight: usize) -> Option<Change> {
        self.throttled_in_window = true;
        self.calm = 0;
        if self.last_decrease.is_some_and(|at| now.saturating_duration_since(at) < self.window()) {
            return None;
        }
        let from = self.limit();
        let base = self.limit.min(inflight.max(1) as f64);
        self.limit = (base * DECREASE).max(self.floor as f64);
        self.last_decrease = Some(now);
        let to = self.limit();
        (to != from).then_some(Change::Decreased { from, to })
    }

    /// An attempt succeeded after `rtt` while `inflight` were in flight on this lane.
    pub fn succeeded(&mut self, now: Instant, inflight: usize, rtt: Duration) -> Option<Change> {
        self.rtt = Some(smooth(self.rtt, rtt));
        self.rtt_baseline = Some(self.rtt_baseline.map_or(rtt, |base| base.min(rtt)));
        self.peak_inflight = self.peak_inflight.max(inflight);
        if now.saturating_duration_since(self.window_start) < self.window() {
            return None;
        }
        let used = self.peak_inflight * 2 >= self.limit();
        let calm = match (self.rtt, self.rtt_baseline) {
            (Some(rtt), Some(base)) => {
                rtt.as_secs_f64() <= base.as_secs_f64() * LATENCY_GUARD || rtt <= base + LATENCY_SLACK
            }
            _ => true,
        };
        let grow = used && calm && !self.throttled_in_window && self.limit() < self.ceiling;
        self.window_start = now;
        self.throttled_in_window = false;
        self.peak_inflight = inflight;
        if grow {
            let step = 1 + self.calm / CALM_STEP;
            self.calm += 1;
            self.limit = (self.limit.floor() + f64::from(step)).min(self.ceiling as f64);
            return Some(Change::Increased { to: self.limit() });
        }
        self.calm = 0;
        None
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
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    #[test]
    fn a_burst_of_throttles_is_one_decrease_per_window() {
        let start = Instant::now();
        let mut aimd = Aimd::new(1, 100, start);
        assert_eq!(aimd.throttled(start, 100), Some(Change::Decreased { from: 100, to: 95 }));
        for ms in 1..50 {
            assert_eq!(aimd.throttled(start + Duration::from_millis(ms), 95), None, "same overload");
        }
        assert_eq!(aimd.limit(), 95);
        // One window later, another throttle decreases again.
        assert_eq!(aimd.throttled(start + MIN_WINDOW * 5, 95), Some(Change::Decreased { from: 95, to: 90 }));
    }

    #[test]
    fn a_decrease_scales_from_what_was_in_flight() {
        let start = Instant::now();
        let mut aimd = Aimd::new(1, 500, start);
        assert_eq!(aimd.throttled(start, 41), Some(Change::Decreased { from: 500, to: 38 }));
    }

    #[test]
    fn the_floor_holds() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(3, 10, now);
        for _ in 0..20 {
            aimd.throttled(now, 10);
            now += MAX_WINDOW;
        }
        assert_eq!(aimd.limit(), 3);
    }

    /// Feeds one window of successes at `inflight` (each holding its slot for `RTT`) and returns the
    /// limit after it.
    fn window_of_successes(aimd: &mut Aimd, now: &mut Instant, inflight: usize, rtt: Duration) -> usize {
        for _ in 0..5 {
            *now += RTT / 4;
            aimd.succeeded(*now, inflight, rtt);
            aimd.released(RTT);
        }
        aimd.limit()
    }

    #[test]
    fn the_window_is_the_slot_hold_time() {
        let now = Instant::now();
        let mut aimd = Aimd::new(1, 100, now);
        assert_eq!(aimd.window(), MIN_WINDOW * 5, "before any sample");
        for _ in 0..50 {
            aimd.released(Duration::from_secs(2));
        }
        assert!(aimd.window() > Duration::from_millis(1900));
        aimd.released(Duration::from_secs(60));
        assert!(aimd.window() <= MAX_WINDOW);
    }

    #[test]
    fn increases_only_when_the_limit_is_used() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(1, 100, now);
        aimd.throttled(now, 20);
        assert_eq!(aimd.limit(), 19);
        now += RTT * 2;
        window_of_successes(&mut aimd, &mut now, 2, RTT); // clears the throttled window
        assert_eq!(window_of_successes(&mut aimd, &mut now, 2, RTT), 19, "2 in flight: limit unused, no increase");
        assert_eq!(window_of_successes(&mut aimd, &mut now, 12, RTT), 20, "used: +1 per window");
        assert_eq!(window_of_successes(&mut aimd, &mut now, 12, RTT), 21);
    }

    #[test]
    fn a_long_calm_speeds_the_increase_and_a_throttle_resets_it() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(1, 1000, now);
        aimd.released(RTT); // the window is now one RTT
        aimd.throttled(now, 10);
        // Exactly one window end per step, the limit fully used.
        let mut step = |aimd: &mut Aimd| {
            now += RTT;
            let before = aimd.limit();
            aimd.succeeded(now, before, RTT);
            aimd.released(RTT);
            aimd.limit() - before
        };
        assert_eq!(step(&mut aimd), 0, "the window with the throttle ends without an increase");
        let steps: Vec<usize> = (0..12).map(|_| step(&mut aimd)).collect();
        assert_eq!(steps, vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
        let limit = aimd.limit();
        aimd.throttled(Instant::now() + RTT * 20, limit);
        assert_eq!(step(&mut aimd), 0);
        assert_eq!(step(&mut aimd), 1, "back to +1 after a throttle");
    }

    #[test]
    fn no_increase_in_a_window_with_a_throttle_or_a_slow_upstream() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(1, 100, now);
        aimd.throttled(now, 50);
        let after_decrease = aimd.limit();
        window_of_successes(&mut aimd, &mut now, 40, RTT);
        assert_eq!(aimd.limit(), after_decrease, "the window held a throttle");
        // Round trips at 3× their baseline: the upstream is struggling, do not push.
        let mut slow = Aimd::new(1, 100, now);
        slow.throttled(now, 30);
        let limit = slow.limit();
        now += RTT * 10;
        window_of_successes(&mut slow, &mut now, 25, RTT);
        window_of_successes(&mut slow, &mut now, 25, RTT);
        let grown = slow.limit();
        assert!(grown > limit);
        for _ in 0..10 {
            window_of_successes(&mut slow, &mut now, 25, RTT * 3);
        }
        assert!(slow.limit() <= grown + 2, "kept growing while round trips tripled: {}", slow.limit());
    }

    #[test]
    fn the_ceiling_holds() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(1, 5, now);
        for _ in 0..20 {
            window_of_successes(&mut aimd, &mut now, 5, RTT);
        }
        assert_eq!(aimd.limit(), 5);
        aimd.set_bounds(1, 3);
        assert_eq!(aimd.limit(), 3, "a lowered ceiling (reload) applies at once");
        aimd.set_bounds(1, 8);
        assert_eq!(aimd.limit(), 8, "a limit at its ceiling follows a raised one");
        aimd.throttled(now, 8);
        let learned = aimd.limit();
        aimd.set_bounds(1, 20);
        assert_eq!(aimd.limit(), learned, "a learned limit stays where it was learned");
    }
}
