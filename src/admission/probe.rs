//! A lane's gate after a setback (429, 503, another retried 5xx, a failed connection): the lane, not each
//! request, backs off. While probing, the lane dispatches at most one request at a time (the probe), and
//! not before `next_at`; the gap grows with consecutive setbacks of probes that had no success in between:
//! `base · 2^(streak−1)`, capped at `max`, jittered upwards by up to a quarter (never shorter, so the
//! number of attempts a throttling upstream sees is bounded whatever the jitter draws). A Retry-After
//! stretches the gap to at least what it asks (capped at `max`). Any answered attempt of the lane ends
//! probing. Waiting requests stay in the fair queue meanwhile; they cost no timers.
//! A plain struct fed with events and the time.

use std::time::Duration;

use tokio::time::Instant;

/// Largest upward jitter, as a share of the gap.
pub const JITTER: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probing {
    /// When probing began (for the time-paused metric).
    since: Instant,
    /// No probe before this.
    next_at: Instant,
    /// A probe is out and has not come back: since when.
    in_flight: Option<Instant>,
    /// Setbacks of probes in a row (the first setback, which started probing, counts as 1).
    streak: u32,
}

/// Whether a lane's gate lets a dispatch through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Now,
    /// Not before then.
    At(Instant),
    /// Only a returning attempt (a released slot) can open it.
    AfterRelease,
}

#[derive(Debug, Clone, Default)]
pub struct Gate {
    probing: Option<Probing>,
    /// Time spent probing, over every finished probing period.
    total: Duration,
}

impl Gate {
    /// Whether the lane may dispatch at `now`; `max` is how long a probe may stay out.
    pub fn readiness(&self, now: Instant, max: Duration) -> Readiness {
        match self.probing {
            None => Readiness::Now,
            Some(Probing { in_flight: Some(sent), next_at, .. }) => {
                let given_up = sent.checked_add(max).unwrap_or(sent).max(next_at);
                if now < given_up {
                    Readiness::At(given_up)
                } else {
                    Readiness::Now
                }
            }
            Some(p) if now < p.next_at => Readiness::At(p.next_at),
            Some(_) => Readiness::Now,
        }
    }

    /// A dispatch went through at `now`; returns whether it is a probe.
    pub fn dispatched(&mut self, now: Instant) -> bool {
        match &mut self.probing {
            Some(p) => {
                p.in_flight = Some(now);
                true
            }
            None => false,
        }
    }

    /// An attempt was throttled or failed. `probe`: it was this gate's probe; a setback of an attempt
    /// dispatched before probing began is part of the same episode and does not lengthen the gap.
    pub fn setback(&mut self, now: Instant, retry_after: Option<Duration>, probe: bool, base: Duration, max: Duration) {
        let asked = retry_after.map(|wait| now.checked_add(wait.min(max)).unwrap_or(now));
        match &mut self.probing {
            None => {
                let next_at = now.checked_add(gap(1, base, max)).unwrap_or(now).max(asked.unwrap_or(now));
                self.probing = Some(Probing { since: now, next_at, in_flight: None, streak: 1 });
            }
            Some(p) if probe => {
                p.streak = p.streak.saturating_add(1);
                p.in_flight = None;
                p.next_at = now.checked_add(gap(p.streak, base, max)).unwrap_or(now).max(asked.unwrap_or(now));
            }
            Some(p) => p.next_at = p.next_at.max(asked.unwrap_or(now)),
        }
    }

    /// An attempt of the lane was accepted: probing ends.
    pub fn answered(&mut self, now: Instant) {
        if let Some(p) = self.probing.take() {
            self.total += now.saturating_duration_since(p.since);
        }
    }

    /// A probe came back without a verdict on capacity (its client went away, or a 4xx): another may go.
    pub fn probe_returned(&mut self) {
        if let Some(p) = &mut self.probing {
            p.in_flight = None;
        }
    }

    pub fn probing(&self) -> bool {
        self.probing.is_some()
    }

    /// Setbacks in a row while probing (0 when not probing).
    pub fn streak(&self) -> u32 {
        self.probing.map_or(0, |p| p.streak)
    }

    /// When the next probe may go, while probing.
    pub fn next_probe(&self) -> Option<Instant> {
        self.probing.map(|p| p.next_at)
    }

    /// Time spent probing since start, the current period included.
    pub fn total(&self, now: Instant) -> Duration {
        self.total + self.probing.map_or(Duration::ZERO, |p| now.saturating_duration_since(p.since))
    }
}

/// The gap before the next probe after `streak` setbacks: `base · 2^(streak−1)` capped at `max`, times
/// a random factor in [1, 1 + JITTER] (capped at `max` again).
pub fn gap(streak: u32, base: Duration, max: Duration) -> Duration {
    let exp = streak.saturating_sub(1).min(30);
    let nominal = base.saturating_mul(1u32 << exp).min(max);
    let jittered = nominal.as_secs_f64() * (1.0 + JITTER * fastrand::f64());
    Duration::try_from_secs_f64(jittered).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    /// Attempts a lone request makes against an upstream that always throttles, within `horizon`.
    fn attempts_against_a_wall(horizon: Duration) -> usize {
        let start = Instant::now();
        let mut gate = Gate::default();
        let mut now = start;
        let mut attempts = 0;
        while now <= start + horizon {
            match gate.readiness(now, MAX) {
                Readiness::Now => {
                    let probe = gate.dispatched(now);
                    attempts += 1;
                    gate.setback(now, None, probe, BASE, MAX);
                }
                Readiness::At(at) => now = at,
                Readiness::AfterRelease => unreachable!("every probe came back"),
            }
        }
        attempts
    }

    #[test]
    fn a_wall_sees_few_attempts_whatever_the_jitter() {
        for _ in 0..200 {
            assert!(attempts_against_a_wall(Duration::from_secs(3)) <= 4);
            assert!(attempts_against_a_wall(Duration::from_secs(40)) <= 6);
        }
    }

    #[test]
    fn one_probe_at_a_time_and_the_gap_grows() {
        let start = Instant::now();
        let mut gate = Gate::default();
        assert_eq!(gate.readiness(start, MAX), Readiness::Now);
        assert!(!gate.dispatched(start), "an open gate dispatches no probes");
        gate.setback(start, None, false, BASE, MAX);
        let Readiness::At(first) = gate.readiness(start, MAX) else { panic!("probing waits") };
        assert!(first - start >= BASE && first - start <= BASE.mul_f64(1.0 + JITTER));
        assert!(gate.dispatched(first), "the first dispatch after the gap is a probe");
        assert_eq!(gate.readiness(first, MAX), Readiness::At(first + MAX), "one probe at a time");
        gate.setback(first, None, true, BASE, MAX);
        let Readiness::At(second) = gate.readiness(first, MAX) else { panic!("probing waits") };
        assert!(second - first >= 2 * BASE, "the gap doubled: {:?}", second - first);
        assert_eq!(gate.streak(), 2);
    }

    #[test]
    fn stragglers_of_the_same_episode_do_not_lengthen_the_gap() {
        let start = Instant::now();
        let mut gate = Gate::default();
        gate.setback(start, None, false, BASE, MAX);
        let next = gate.next_probe();
        for _ in 0..50 {
            gate.setback(start, None, false, BASE, MAX);
        }
        assert_eq!(gate.next_probe(), next);
        assert_eq!(gate.streak(), 1);
    }

    #[test]
    fn retry_after_stretches_the_gap_capped_by_max() {
        let start = Instant::now();
        let mut gate = Gate::default();
        gate.setback(start, Some(Duration::from_secs(7)), false, BASE, MAX);
        assert_eq!(gate.next_probe(), Some(start + Duration::from_secs(7)));
        gate.setback(start, Some(Duration::from_secs(3600)), false, BASE, MAX);
        assert_eq!(gate.next_probe(), Some(start + MAX), "a straggler's longer Retry-After, capped");
    }

    #[test]
    fn an_answer_ends_probing_and_a_departed_probe_frees_the_gate() {
        let start = Instant::now();
        let mut gate = Gate::default();
        gate.setback(start, None, false, BASE, MAX);
        let later = start + MAX;
        assert!(gate.dispatched(later));
        gate.probe_returned();
        assert_eq!(gate.readiness(later, MAX), Readiness::Now);
        gate.answered(later);
        assert!(!gate.probing());
        assert_eq!(gate.total(later), MAX);
        assert!(!gate.dispatched(later));
    }

    #[test]
    fn a_probe_that_never_comes_back_is_given_up_on() {
        let start = Instant::now();
        let mut gate = Gate::default();
        gate.setback(start, None, false, BASE, MAX);
        let probe_at = gate.next_probe().unwrap();
        assert!(gate.dispatched(probe_at));
        assert_eq!(gate.readiness(probe_at + MAX / 2, MAX), Readiness::At(probe_at + MAX));
        assert_eq!(gate.readiness(probe_at + MAX, MAX), Readiness::Now, "lost: the next probe may go");
    }

    #[test]
    fn the_gap_saturates() {
        assert!(gap(u32::MAX, Duration::MAX, Duration::MAX) <= Duration::MAX);
        assert_eq!(gap(100, BASE, MAX), MAX);
    }
}
