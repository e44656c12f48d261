//! Where `limits.rate`'s tokens come from: this instance's own GCRA, or — in a cluster whose Redis is
//! reachable — tokens the cluster task took from the GCRA shared in Redis (`cluster/scripts.rs`, on
//! Redis's clock) and handed over in small batches. Handed-over tokens lapse after `TOKEN_LIFE`, so an
//! instance cannot save a burst for later and spend it on top of what the others take meanwhile. While
//! Redis is away, the own GCRA runs at the configured rate divided among the last known members.
//! A plain struct fed with the time.

use std::time::Duration;

use tokio::time::Instant;

/// How long tokens taken from the shared GCRA may be spent.
pub const TOKEN_LIFE: Duration = Duration::from_secs(1);
/// How long the dispatcher waits for shared tokens before it looks again (the cluster task wakes it
/// sooner when tokens come).
pub const TOKEN_RECHECK: Duration = Duration::from_millis(250);

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The own GCRA, its rate divided by `share` (1 alone; the last known members while Redis is away).
    Own { share: u32 },
    /// Tokens handed over from the cluster's GCRA.
    Shared(Batch),
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::Own { share: 1 }
    }
}

/// Tokens handed over by the cluster task, and whether a dispatch found none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    count: u32,
    until: Option<Instant>,
    starved: bool,
}

impl Batch {
    /// Spends a token: `None` when there was one, else how long until it is worth looking again.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        if self.count > 0 && self.until.is_some_and(|until| now < until) {
            self.count -= 1;
            return None;
        }
        self.count = 0;
        self.starved = true;
        Some(TOKEN_RECHECK)
    }

    /// `count` more tokens, all to be spent within `TOKEN_LIFE` from `now`.
    pub fn add(&mut self, count: u32, now: Instant) {
        if self.until.is_none_or(|until| now >= until) {
            self.count = 0;
        }
        self.count = self.count.saturating_add(count);
        self.until = now.checked_add(TOKEN_LIFE);
        self.starved = false;
    }

    /// Whether a dispatch found no token since the last batch (the cluster task should take more).
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// Tokens left to spend at `now`.
    pub fn left(&self, now: Instant) -> u32 {
        if self.until.is_some_and(|until| now < until) {
            self.count
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_over_tokens_are_spent_once_and_lapse() {
        let now = Instant::now();
        let mut batch = Batch::default();
        assert_eq!(batch.take(now), Some(TOKEN_RECHECK), "none yet");
        assert!(batch.starved());
        batch.add(2, now);
        assert!(!batch.starved());
        assert_eq!(batch.left(now), 2);
        assert_eq!(batch.take(now), None);
        assert_eq!(batch.take(now), None);
        assert_eq!(batch.take(now), Some(TOKEN_RECHECK), "two were handed over");
        batch.add(3, now);
        let later = now + TOKEN_LIFE;
        assert_eq!(batch.left(later), 0);
        assert_eq!(batch.take(later), Some(TOKEN_RECHECK), "lapsed after TOKEN_LIFE");
        batch.add(1, later);
        assert_eq!(batch.left(later), 1, "a lapsed batch does not add to a new one");
    }
}
