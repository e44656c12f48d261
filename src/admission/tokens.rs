//! Where `limits.rate`'s tokens come from: this instance's own GCRA, or — in a cluster whose Redis is
//! reachable — tokens the cluster task reserved on the GCRA shared in Redis (`cluster/scripts.rs`, on
//! Redis's clock), each with the moment it conforms. A reserved token is spent at its moment or later,
//! and lapses `TOKEN_LIFE` after it, so an instance cannot save a burst for later and spend it on top of
//! what the others take meanwhile. While Redis is away — or the cluster task has not answered a starved
//! dispatcher for `TOKEN_FALLBACK` — the own GCRA runs at the configured rate divided among the last
//! known members. A plain struct fed with the time.

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
/// A dispatcher starved this long with no answer from the cluster task falls back to its own GCRA.
pub const TOKEN_FALLBACK: Duration = Duration::from_secs(2);
/// The most tokens held at once (a reservation is also bounded by the burst and the horizon).
pub const TOKENS_HELD: u32 = 4096;
const MOST_HELD: usize = TOKENS_HELD as usize;

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The own GCRA, its rate divided by `share` (1 alone; the last known members while Redis is away).
    Own { share: u32 },
    /// Tokens reserved on the cluster's GCRA; the own GCRA, at a `members`' share, is the fallback.
    Shared { batch: Batch, members: u32 },
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::Own { share: 1 }
    }
}

impl TokenSource {
    /// What the own GCRA's rate is divided by.
    pub fn share(&self) -> u32 {
        match self {
            Self::Own { share } => *share,
            Self::Shared { members, .. } => *members,
        }
    }
}

/// Tokens reserved by the cluster task (the moment each conforms, in order); since when a dispatch
/// found none, and when the cluster task last answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    moments: VecDeque<Instant>,
    starved_since: Option<Instant>,
    heard: Option<Instant>,
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
                self.starved_since.get_or_insert(now);
                Some(TOKEN_RECHECK)
            }
        }
    }

    /// The cluster task answered: `count` more tokens (perhaps none), the first conforming `first` µs
    /// from `now`, the others one `interval` apart. One whose moment already passed (a burst) conforms
    /// now, and lapses `TOKEN_LIFE` from now.
    pub fn add(&mut self, count: u32, first: i64, interval: Duration, now: Instant) {
        self.lapse(now);
        self.heard = Some(now);
        if count == 0 {
            return;
        }
        let step = i128::try_from(interval.as_micros()).unwrap_or(i128::MAX);
        for k in 0..count {
            if self.moments.len() >= MOST_HELD {
                break;
            }
            let offset = i128::from(first).saturating_add(step.saturating_mul(i128::from(k)));
            let ahead = u64::try_from(offset.max(0)).unwrap_or(u64::MAX);
            self.moments.push_back(now.checked_add(Duration::from_micros(ahead)).unwrap_or(now));
        }
        self.starved_since = None;
    }

    /// Whether a dispatch found no token since the last batch (the cluster task should reserve more).
    pub fn starved(&self) -> bool {
        self.starved_since.is_some()
    }

    /// The cluster task looked at the demand (it is alive); with nothing that could use a token, the
    /// dispatcher is no longer starved.
    pub fn heard(&mut self, now: Instant, wanted: bool) {
        self.heard = Some(now);
        if !wanted {
            self.starved_since = None;
        }
    }

    /// Whether the dispatcher has been starved for `TOKEN_FALLBACK` without a word from the cluster task.
    pub fn abandoned(&self, now: Instant) -> bool {
        let long = |since: Option<Instant>| since.is_none_or(|at| now.saturating_duration_since(at) >= TOKEN_FALLBACK);
        self.starved_since.is_some() && long(self.starved_since) && long(self.heard)
    }

    /// Tokens reserved and not lapsed at `now`.
    pub fn left(&self, now: Instant) -> u32 {
        let live = self.moments.iter().rev().take_while(|at| now < **at + TOKEN_LIFE).count();
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
        // Four tokens 100 ms apart, the first conformed 150 ms ago (a burst): two conform now.
        batch.add(4, -150_000, ms(100), now);
        assert!(!batch.starved());
        assert_eq!(batch.left(now), 4);
        assert_eq!(batch.take(now), None);
        assert_eq!(batch.take(now), None);
        assert_eq!(batch.take(now), Some(ms(50)), "the third conforms 50 ms from now");
        assert_eq!(batch.take(now + ms(50)), None);
        // The fourth (due at 150 ms) lapses a second after its moment.
        let late = now + ms(150) + TOKEN_LIFE;
        assert_eq!(batch.left(late), 0);
        assert_eq!(batch.take(late), Some(TOKEN_RECHECK), "lapsed");
        batch.add(1, 20_000, ms(100), late);
        assert_eq!(batch.take(late), Some(ms(20)), "reserved for 20 ms from now");
        let mut burst = Batch::default();
        burst.add(5, -60_000_000, ms(100), now);
        assert_eq!(burst.left(now + ms(999)), 5, "a burst reserved long ago conforms now and lapses a second from now");
    }

    #[test]
    fn a_starved_dispatcher_falls_back_only_when_the_cluster_task_is_silent() {
        let now = Instant::now();
        let mut batch = Batch::default();
        assert!(batch.take(now).is_some());
        assert!(!batch.abandoned(now + TOKEN_FALLBACK / 2));
        batch.add(0, 0, Duration::from_millis(100), now + TOKEN_FALLBACK / 2);
        assert!(!batch.abandoned(now + TOKEN_FALLBACK), "the task answered (no token free) a second ago");
        assert!(batch.abandoned(now + TOKEN_FALLBACK * 2), "silent for two seconds, starved for four");
        batch.add(1, 0, Duration::from_millis(100), now + TOKEN_FALLBACK * 2);
        assert!(!batch.abandoned(now + TOKEN_FALLBACK * 2) && !batch.starved());
        // Starved, then nothing waits any more: the task, looking, clears it (no fallback later).
        let later = now + TOKEN_FALLBACK * 2 + Duration::from_millis(10);
        assert_eq!(batch.take(later), None);
        assert!(batch.take(later).is_some() && batch.starved());
        batch.heard(later, false);
        assert!(!batch.starved() && !batch.abandoned(later + TOKEN_FALLBACK * 2));
    }
}
