//! The last minute, for `/status` and the dashboard: per-second buckets of attempts, throttled attempts,
//! answered requests and tokens, and the most recent queue waits for percentiles. A plain struct fed
//! with events; the caller holds it behind a mutex for a few nanoseconds at a time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How far back "recent" reaches.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How many recent queue waits are kept for percentiles.
const WAITS: usize = 1024;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    second: u64,
    attempts: u64,
    throttled: u64,
    requests: u64,
    tokens: u64,
}

/// Recent activity.
#[derive(Debug)]
pub struct Recent {
    origin: Instant,
    buckets: VecDeque<Bucket>,
    waits: VecDeque<f64>,
}

impl Default for Recent {
    fn default() -> Self {
        Self { origin: Instant::now(), buckets: VecDeque::new(), waits: VecDeque::new() }
    }
}

/// What `/status` shows of the last minute.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentSummary {
    pub window_seconds: u64,
    pub requests: u64,
    pub upstream_attempts: u64,
    pub upstream_429: u64,
    /// Share of upstream attempts answered 429 (0 to 1).
    pub upstream_429_rate: f64,
    pub tokens: u64,
    pub queue_wait_p50_ms: f64,
    pub queue_wait_p99_ms: f64,
}

impl Recent {
    pub fn attempt(&mut self, throttled: bool) {
        let bucket = self.bucket(Instant::now());
        bucket.attempts += 1;
        bucket.throttled += u64::from(throttled);
    }

    pub fn request(&mut self, waited: Duration) {
        self.bucket(Instant::now()).requests += 1;
        if self.waits.len() == WAITS {
            self.waits.pop_front();
        }
        self.waits.push_back(waited.as_secs_f64() * 1000.0);
    }

    pub fn tokens(&mut self, n: u64) {
        self.bucket(Instant::now()).tokens += n;
    }

    pub fn summary(&self) -> RecentSummary {
        self.summary_at(Instant::now())
    }

    fn summary_at(&self, now: Instant) -> RecentSummary {
        let oldest = self.second(now).saturating_sub(WINDOW.as_secs() - 1);
        let live = self.buckets.iter().filter(|b| b.second >= oldest);
        let (mut requests, mut attempts, mut throttled, mut tokens) = (0, 0, 0, 0);
        for bucket in live {
            requests += bucket.requests;
            attempts += bucket.attempts;
            throttled += bucket.throttled;
            tokens += bucket.tokens;
        }
        let mut waits: Vec<f64> = self.waits.iter().copied().collect();
        waits.sort_by(f64::total_cmp);
        RecentSummary {
            window_seconds: WINDOW.as_secs(),
            requests,
            upstream_attempts: attempts,
            upstream_429: throttled,
            upstream_429_rate: if attempts == 0 { 0.0 } else { throttled as f64 / attempts as f64 },
            tokens,
            queue_wait_p50_ms: percentile(&waits, 0.50),
            queue_wait_p99_ms: percentile(&waits, 0.99),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let second = self.second(now);
        while self.buckets.front().is_some_and(|b| b.second + WINDOW.as_secs() <= second) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.second != second) {
            self.buckets.push_back(Bucket { second, ..Bucket::default() });
        }
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }
}

/// The `q` quantile of sorted values (nearest rank), 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_429_share_of_attempts() {
        let mut recent = Recent::default();
        for i in 0..10 {
            recent.attempt(i < 3);
        }
        let summary = recent.summary();
        assert_eq!((summary.upstream_attempts, summary.upstream_429), (10, 3));
        assert!((summary.upstream_429_rate - 0.3).abs() < 1e-9);
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let mut recent = Recent::default();
        let start = recent.origin;
        recent.bucket(start).attempts = 5;
        recent.bucket(start + Duration::from_secs(30)).attempts = 2;
        assert_eq!(recent.summary_at(start + Duration::from_secs(59)).upstream_attempts, 7);
        assert_eq!(recent.summary_at(start + Duration::from_secs(61)).upstream_attempts, 2);
        recent.bucket(start + Duration::from_secs(200));
        assert_eq!(recent.buckets.len(), 1, "stale buckets are dropped");
    }

    #[test]
    fn wait_percentiles() {
        let mut recent = Recent::default();
        for ms in 1..=100 {
            recent.request(Duration::from_millis(ms));
        }
        let summary = recent.summary();
        assert_eq!(summary.queue_wait_p50_ms, 50.0);
        assert_eq!(summary.queue_wait_p99_ms, 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
