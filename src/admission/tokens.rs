//! Where `limits.rate`'s tokens come from: this instance's own GCRA, or — in a cluster whose Redis is
//! reachable — tokens the cluster task reserved on the GCRA shared in Redis (`cluster/scripts.rs`, on
//! Redis's clock), each with the moment it conforms. A reserved token is spent at its moment or later,
//! and lapses `TOKEN_LIFE` after it, so an instance cannot save a burst for later and spend it on top of
//! what the others take meanwhile. While Redis is away, the own GCRA runs at the configured rate divided
//! among the last known members. A plain struct fed with the time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How long after its moment a reserved token may still be spent.
pub const TOKEN_LIFE: Duration = Duration::from_secs(1);
/// How far ahead the cluster task reserves tokens.
pub const TOKEN_HORIZON: Duration = Duration::from_millis(500);
/// How long the dispatcher waits for tokens before it looks again (the cluster task wakes it sooner
/// when tokens come).
pub const TOKEN_RECHECK: Duration = Duration::from_millis(250);

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The own GCRA, its rate divided by `share` (1 alone; the last known members while Redis is away).
    Own { share: u32 },
    /// Tokens reserved on the cluster's GCRA.
    Shared(Batch),
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::Own { share: 1 }
    }
}

/// Tokens reserved by the cluster task (the moment each conforms, in order), and whether a dispatch
/// found none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    moments: VecDeque<Instant>,
    starved: bool,
}

impl Batch {
    /// Spends a token: `None` when one conforms, else how long until one does (or it is worth looking
    /// again, with none reserved).
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        self.lapse(now);
        match self.moments.front() {
            Some(at) if *at <= now => {
                self.moments.pop_front();
                None
            }
            Some(at) => Some(*at - now),
            None => {
                self.starved = true;
                Some(TOKEN_RECHECK)
            }
        }
    }

    /// `count` more tokens, the first conforming `first` from `now` (negative: it already does), the
    /// others one `interval` apart.
    pub fn add(&mut self, count: u32, first: i64, interval: Duration, now: Instant) {
        let offset = Duration::from_micros(first.unsigned_abs());
        let start = if first < 0 { now.checked_sub(offset) } else { now.checked_add(offset) }.unwrap_or(now);
        let mut at = start;
        for _ in 0..count {
            self.moments.push_back(at);
            at = at.checked_add(interval).unwrap_or(at);
        }
        self.starved = false;
    }

    /// Whether a dispatch found no token since the last batch (the cluster task should reserve more).
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// Tokens reserved and not lapsed at `now`.
    pub fn left(&self, now: Instant) -> u32 {
        let live = self.moments.iter().filter(|at| now < **at + TOKEN_LIFE).count();
        u32::try_from(live).unwrap_or(u32::MAX)
    }

    fn lapse(&mut self, now: Instant) {
        while self.moments.front().is_some_and(|at| now >= *at + TOKEN_LIFE) {
            self.moments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_tokens_are_spent_once_each_at_their_moment_and_lapse() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut batch = Batch::default();
        assert_eq!(batch.take(now), Some(TOKEN_RECHECK), "none yet");
        assert!(batch.starved());
        // Three tokens: the first conformed 5 ms ago, then one each 100 ms.
        batch.add(3, -5_000, ms(100), now);
        assert!(!batch.starved());
        assert_eq!(batch.left(now), 3);
        assert_eq!(batch.take(now), None);
        assert_eq!(batch.take(now), Some(ms(95)), "the second conforms 95 ms from now");
        assert_eq!(batch.take(now + ms(95)), None);
        assert_eq!(batch.take(now + ms(95)), Some(ms(100)));
        // The third lapses a second after its moment.
        let late = now + ms(195) + TOKEN_LIFE;
        assert_eq!(batch.left(late), 0);
        assert_eq!(batch.take(late), Some(TOKEN_RECHECK), "lapsed");
        batch.add(1, 20_000, ms(100), late);
        assert_eq!(batch.take(late), Some(ms(20)), "reserved for 20 ms from now");
    }
}
