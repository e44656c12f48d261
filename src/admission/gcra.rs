//! A GCRA rate limiter (generic cell rate algorithm) on tokio's clock, whose rate can change in place.
//! State is one instant, the theoretical arrival time (TAT). A change of rate rescales what is owed
//! (TAT − now, in tokens) to the new interval instead of starting over, so neither a decrease nor an
//! increase of the effective rate ever hands out a fresh burst. A plain struct fed with the time.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Gcra {
    /// Time between two tokens at the steady rate (the emission interval T).
    interval: Duration,
    /// Tokens that may go at once above the steady rate.
    burst: u32,
    /// The theoretical arrival time of the next token; None until the first one is taken.
    tat: Option<Instant>,
}

impl Gcra {
    pub fn new(interval: Duration, burst: u32) -> Self {
        Self { interval: interval.max(Duration::from_nanos(1)), burst: burst.max(1), tat: None }
    }

    /// How far ahead of the steady rate a request may be: (burst − 1) × interval.
    fn tolerance(&self) -> Duration {
        self.interval.saturating_mul(self.burst - 1)
    }

    /// How long until a token is available at `now` (None: at once), without taking it.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let tat = self.tat.map_or(now, |tat| tat.max(now));
        let allowed_at = tat.checked_sub(self.tolerance()).unwrap_or(now);
        (allowed_at > now).then(|| allowed_at - now)
    }

    /// Takes a token at `now`: `None` when granted, else how long until one is available.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let tat = self.tat.map_or(now, |tat| tat.max(now));
        let allowed_at = tat.checked_sub(self.tolerance()).unwrap_or(now);
        if allowed_at > now {
            return Some(allowed_at - now);
        }
        self.tat = Some(tat.checked_add(self.interval).unwrap_or(tat));
        None
    }

    /// Changes the emission interval in place: the tokens already owed stay owed, at the new interval.
    pub fn set_interval(&mut self, interval: Duration, now: Instant) {
        let interval = interval.max(Duration::from_nanos(1));
        if let Some(tat) = self.tat.filter(|tat| *tat > now) {
            let owed = (tat - now).as_secs_f64() / self.interval.as_secs_f64();
            let rescaled = Duration::try_from_secs_f64(owed * interval.as_secs_f64()).unwrap_or(Duration::MAX);
            self.tat = Some(now.checked_add(rescaled).unwrap_or(tat));
        }
        self.interval = interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Grants at `now` until refused; returns how many.
    fn drain(gcra: &mut Gcra, now: Instant) -> usize {
        std::iter::from_fn(|| gcra.take(now).is_none().then_some(())).take(10_000).count()
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let start = Instant::now();
        let mut gcra = Gcra::new(100 * MS, 3);
        assert_eq!(drain(&mut gcra, start), 3, "the burst");
        assert_eq!(gcra.take(start), Some(100 * MS));
        assert_eq!(gcra.take(start + 100 * MS), None);
        assert_eq!(gcra.take(start + 100 * MS), Some(100 * MS));
        // Idle for a long time: the burst comes back, never more.
        assert_eq!(drain(&mut gcra, start + Duration::from_secs(60)), 3);
    }

    #[test]
    fn lowering_the_rate_grants_no_burst() {
        let start = Instant::now();
        let mut gcra = Gcra::new(10 * MS, 10);
        assert_eq!(drain(&mut gcra, start), 10);
        gcra.set_interval(20 * MS, start);
        assert_eq!(drain(&mut gcra, start), 0, "the burst was spent before the change");
        // Ten tokens owed at 20 ms each: the next one comes after one interval of the new rate.
        assert_eq!(gcra.take(start), Some(20 * MS));
        let mut granted = 0;
        let mut at = start;
        while at < start + Duration::from_secs(1) {
            granted += usize::from(gcra.take(at).is_none());
            at += MS;
        }
        assert!((49..=51).contains(&granted), "{granted} in a second at 50/s");
    }

    #[test]
    fn raising_the_rate_grants_no_burst_either() {
        let start = Instant::now();
        let mut gcra = Gcra::new(20 * MS, 5);
        assert_eq!(drain(&mut gcra, start), 5);
        gcra.set_interval(10 * MS, start);
        assert_eq!(drain(&mut gcra, start), 0);
        assert_eq!(gcra.take(start), Some(10 * MS));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let start = Instant::now();
        let mut gcra = Gcra::new(Duration::MAX, u32::MAX);
        assert_eq!(gcra.take(start), None);
        gcra.set_interval(Duration::ZERO, start);
        gcra.set_interval(Duration::MAX, start);
        let _ = gcra.take(start);
    }
}
