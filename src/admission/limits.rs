//! The limits in force, derived from the config: the global caps and queue bound, the GCRA rate limiter
//! (and its effective rate, which follows the learned limits), the accounts and their per-model caps,
//! aliases, and how a new lane starts. Also the view of a lane that metrics and `/status` show.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::controller::Controller;
use super::gcra::Gcra;
use super::lane::{Delays, Lane};
use super::tokens::{Batch, TokenSource};
use crate::config::{LimitsConfig, QueueConfig, Rate, RetryConfig};

/// With a configured rate and the adaptive limit on: the effective rate scales by this on a learned
/// limit's decrease…
pub const RATE_DECREASE: f64 = 0.95;
/// …regains this share of the configured rate on an increase…
pub const RATE_STEP: f64 = 0.05;
/// …at most once per this interval each way…
pub const RATE_CHANGE_INTERVAL: Duration = Duration::from_secs(1);
/// …and never drops below this share of the configured one.
pub const RATE_FLOOR: f64 = 0.1;

/// An account as admission sees it: a name (a label, never a key), a weight, and caps per model.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountLimits {
    pub name: Arc<str>,
    /// Share of traffic when several accounts have headroom.
    pub weight: u32,
    /// Per-model caps of this account (over `[limits.models]`).
    pub caps: HashMap<String, usize>,
    /// A fallback's own account (another upstream): it serves only requests sent to that fallback.
    pub fallback_only: bool,
}

impl AccountLimits {
    /// The one account of a single-key setup.
    pub fn default_account() -> Self {
        Self { name: Arc::from(DEFAULT_ACCOUNT), weight: 1, caps: HashMap::new(), fallback_only: false }
    }
}

/// The account name of a single-key configuration.
pub const DEFAULT_ACCOUNT: &str = "default";

/// The limits in force.
pub struct Limits {
    max_concurrency: usize,
    max_depth: usize,
    adaptive: bool,
    min_concurrency: usize,
    caps: HashMap<String, usize>,
    aliases: HashMap<String, String>,
    pub accounts: Vec<AccountLimits>,
    pub delays: Delays,
    /// The configured rate and burst, the limiter, and the effective rate as a share of the configured.
    rate: Option<RateLimit>,
    /// Where the rate's tokens come from: the own GCRA, or a cluster's shared one (kept whether or not a
    /// rate is configured, so a reload that adds one takes its tokens from the right place).
    source: TokenSource,
}

struct RateLimit {
    rate: Rate,
    burst: u32,
    gcra: Gcra,
    factor: f64,
    last_change: Option<Instant>,
}

/// What a cluster's shared GCRA needs to hand this instance tokens (`Admission::rate_demand`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDemand {
    /// The effective emission interval here (the configured rate, scaled by the learned limits).
    pub interval: Duration,
    pub burst: u32,
    /// Tokens still to spend, and whether a dispatch found none since the last batch.
    pub left: u32,
    pub starved: bool,
}

impl RateLimit {
    /// The effective emission interval: the configured one, scaled by the learned limits.
    fn interval(&self) -> Duration {
        self.rate.interval().div_f64(self.factor)
    }

    /// Puts the effective interval, divided among `share` instances, in force on the own GCRA.
    fn rescale(&mut self, share: u32, now: Instant) {
        self.gcra.set_interval(self.interval().saturating_mul(share), now);
    }
}

impl Limits {
    /// Derives the limits; `previous` lends its limiter state when the rate and burst are unchanged, so a
    /// reload does not hand out a fresh burst.
    pub fn new(
        limits: &LimitsConfig,
        queue: &QueueConfig,
        retry: &RetryConfig,
        accounts: Vec<AccountLimits>,
        previous: Option<Limits>,
    ) -> Self {
        let wanted = limits.rate.zip(limits.effective_burst());
        let (previous, source) = previous.map_or((None, TokenSource::default()), |p| (p.rate, p.source));
        let kept = previous.filter(|r| Some((r.rate, r.burst)) == wanted);
        let rate = kept.or_else(|| {
            let (rate, burst) = wanted?;
            let mut fresh =
                RateLimit { rate, burst, gcra: Gcra::new(rate.interval(), burst), factor: 1.0, last_change: None };
            fresh.rescale(source.share(), Instant::now());
            Some(fresh)
        });
        Self {
            max_concurrency: limits.max_concurrency as usize,
            max_depth: queue.max_depth,
            adaptive: limits.adaptive,
            min_concurrency: limits.min_concurrency as usize,
            caps: limits.models.iter().map(|(name, m)| (name.clone(), m.max_concurrency as usize)).collect(),
            aliases: limits.aliases.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            accounts: if accounts.is_empty() { vec![AccountLimits::default_account()] } else { accounts },
            delays: Delays { base: retry.base_delay, max: retry.max_delay },
            rate,
            source,
        }
    }

    /// Whether `model` is under `[limits.models]`.
    pub fn configured(&self, model: &str) -> bool {
        self.caps.contains_key(model)
    }

    /// The cap of `model` on `account`: the account's own, else `[limits.models]`.
    pub fn cap(&self, account: &AccountLimits, model: &str) -> Option<usize> {
        account.caps.get(model).or_else(|| self.caps.get(model)).copied()
    }

    /// A new lane for `model` on `account`: its cap and (when adaptive) a learned limit.
    pub fn lane(&self, account: &AccountLimits, model: &str, now: Instant) -> Lane {
        let cap = self.cap(account, model);
        Lane::new(cap, self.controller_for(cap, now), now)
    }

    /// Fits an existing lane to these limits (reload): its cap, and its learned limit kept within the
    /// new bounds, started fresh, or dropped when adaptive is off.
    pub fn refit(&self, account: &AccountLimits, model: &str, lane: &mut Lane, now: Instant) {
        lane.cap = self.cap(account, model);
        let ceiling = lane.cap.unwrap_or(self.max_concurrency);
        lane.controller = match lane.controller.take() {
            Some(mut controller) if self.adaptive => {
                controller.set_bounds(self.min_concurrency, ceiling);
                Some(controller)
            }
            _ => self.controller_for(lane.cap, now),
        };
    }

    fn controller_for(&self, cap: Option<usize>, now: Instant) -> Option<Controller> {
        self.adaptive.then(|| Controller::new(self.min_concurrency, cap.unwrap_or(self.max_concurrency), now))
    }

    pub fn alias<'a>(&'a self, model: &'a str) -> &'a str {
        self.aliases.get(model).map_or(model, String::as_str)
    }

    /// Takes a rate token at `now`; `Some(wait)` when none is available yet.
    pub fn take_rate_token(&mut self, now: Instant) -> Option<Duration> {
        let rate = self.rate.as_mut()?;
        match &mut self.source {
            TokenSource::Own { .. } => rate.gcra.take(now),
            TokenSource::Shared { batch, .. } => match batch.take(now) {
                // The cluster task has been silent while the dispatcher starved: the own GCRA, at a
                // member's share of the rate, keeps requests moving.
                Some(_) if batch.abandoned(now) => rate.gcra.take(now),
                taken => taken,
            },
        }
    }

    /// Takes tokens from a cluster's shared GCRA from now on (`shared`), or from the own one; either way
    /// the own GCRA runs at the rate divided among `members` (1 alone). Switching to shared starts with
    /// no token.
    pub fn set_token_source(&mut self, shared: bool, members: u32, now: Instant) {
        let members = members.max(1);
        self.source = match (std::mem::take(&mut self.source), shared) {
            (TokenSource::Shared { batch, .. }, true) => TokenSource::Shared { batch, members },
            (_, true) => TokenSource::Shared { batch: Batch::default(), members },
            (_, false) => TokenSource::Own { share: members },
        };
        if let Some(rate) = &mut self.rate {
            rate.rescale(members, now);
        }
    }

    /// The cluster task answered: `count` tokens reserved on the shared GCRA (perhaps none), the first
    /// conforming `first_us` from now, the others `interval` apart (ignored unless tokens come from there).
    pub fn hand_over_tokens(&mut self, count: u32, first_us: i64, interval: Duration, now: Instant) {
        if let TokenSource::Shared { batch, .. } = &mut self.source {
            batch.add(count, first_us, interval, now);
        }
    }

    /// The cluster task looked at the demand; `wanted`: something could use a token now.
    pub fn rate_heard(&mut self, now: Instant, wanted: bool) {
        if let TokenSource::Shared { batch, .. } = &mut self.source {
            batch.heard(now, wanted);
        }
    }

    /// Whether a rate is configured and its tokens come from a cluster's shared GCRA.
    pub fn shares_rate(&self) -> bool {
        self.rate.is_some() && matches!(self.source, TokenSource::Shared { .. })
    }

    /// Whether the dispatcher found no shared token since the last batch.
    pub fn rate_starved(&self) -> bool {
        self.rate.is_some() && matches!(&self.source, TokenSource::Shared { batch, .. } if batch.starved())
    }

    /// What the cluster's shared GCRA needs to know, when tokens come from there.
    pub fn rate_demand(&self, now: Instant) -> Option<RateDemand> {
        let rate = self.rate.as_ref()?;
        let TokenSource::Shared { batch, .. } = &self.source else { return None };
        Some(RateDemand {
            interval: rate.interval(),
            burst: rate.burst,
            left: batch.left(now),
            starved: batch.starved(),
        })
    }

    /// A learned limit came down: the effective rate follows (at most once per `RATE_CHANGE_INTERVAL`).
    pub fn rate_down(&mut self, now: Instant) {
        self.scale_rate(now, |factor| (factor * RATE_DECREASE).max(RATE_FLOOR));
    }

    /// A learned limit went up: the effective rate regains `RATE_STEP` of the configured one.
    pub fn rate_up(&mut self, now: Instant) {
        self.scale_rate(now, |factor| (factor + RATE_STEP).min(1.0));
    }

    fn scale_rate(&mut self, now: Instant, step: impl Fn(f64) -> f64) {
        let Some(rate) = &mut self.rate else { return };
        if rate.last_change.is_some_and(|at| now.saturating_duration_since(at) < RATE_CHANGE_INTERVAL) {
            return;
        }
        let factor = step(rate.factor);
        if (factor - rate.factor).abs() < 1e-9 {
            return;
        }
        rate.factor = factor;
        rate.last_change = Some(now);
        rate.rescale(self.source.share(), now);
    }

    /// The effective rate in requests per second, if a rate is configured (this instance's share of it
    /// while a cluster's Redis is away).
    pub fn effective_rate(&self) -> Option<f64> {
        let share = match self.source {
            TokenSource::Own { share } => f64::from(share),
            TokenSource::Shared { .. } => 1.0,
        };
        self.rate.as_ref().map(|r| r.rate.per_second() * r.factor / share)
    }

    /// The configured rate and burst, if any.
    pub fn rate(&self) -> Option<(Rate, u32)> {
        self.rate.as_ref().map(|r| (r.rate, r.burst))
    }

    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }
}

/// A lane as the outside sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneView {
    pub account: String,
    /// The model (aliases resolved), "unknown" or an unconfigured model's name.
    pub name: String,
    pub inflight: usize,
    /// The limit in force (learned or configured); None: only the global cap.
    pub limit: Option<usize>,
    /// The configured cap; None for models not under `limits.models`.
    pub configured: Option<usize>,
    /// The gate is probing after setbacks.
    pub probing: bool,
    /// Time the lane spent probing since start.
    pub probing_total: Duration,
    /// Why the lane holds requests back ("" when it does not).
    pub why: String,
}

impl LaneView {
    /// A bounded label for metrics and status: configured models by name, "unknown", else "other".
    pub fn label(&self) -> &str {
        if self.configured.is_some() || self.name == super::UNKNOWN_MODEL {
            &self.name
        } else {
            "other"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: &str) -> Limits {
        let config = LimitsConfig { rate: Some(rate.parse().unwrap()), burst: Some(1), ..LimitsConfig::default() };
        Limits::new(&config, &QueueConfig::default(), &RetryConfig::default(), vec![], None)
    }

    #[test]
    fn the_effective_rate_follows_the_learned_limits_within_bounds() {
        let mut now = Instant::now();
        let mut limits = limits("100/s");
        assert_eq!(limits.effective_rate(), Some(100.0));
        limits.rate_down(now);
        assert!((limits.effective_rate().unwrap() - 95.0).abs() < 1e-6);
        limits.rate_down(now);
        assert!((limits.effective_rate().unwrap() - 95.0).abs() < 1e-6, "at most once per interval");
        for _ in 0..200 {
            now += RATE_CHANGE_INTERVAL;
            limits.rate_down(now);
        }
        assert!((limits.effective_rate().unwrap() - 100.0 * RATE_FLOOR).abs() < 1e-6, "the floor holds");
        for _ in 0..200 {
            now += RATE_CHANGE_INTERVAL;
            limits.rate_up(now);
        }
        assert_eq!(limits.effective_rate(), Some(100.0), "never above the configured rate");
    }

    #[test]
    fn a_lowered_rate_spaces_tokens_further_apart_without_a_fresh_burst() {
        let now = Instant::now();
        let mut limits = limits("1000/s");
        assert_eq!(limits.take_rate_token(now), None);
        let full_rate_wait = limits.take_rate_token(now).unwrap();
        limits.rate_down(now);
        let slower_wait = limits.take_rate_token(now).unwrap();
        assert!(slower_wait > full_rate_wait, "{slower_wait:?} vs {full_rate_wait:?}");
    }

    #[test]
    fn tokens_come_from_the_cluster_while_shared_and_a_members_share_of_the_rate_without_it() {
        let now = Instant::now();
        let mut limits = limits("10/s");
        limits.set_token_source(true, 1, now);
        assert!(limits.take_rate_token(now).is_some(), "shared: none until the cluster hands some over");
        assert!(limits.rate_demand(now).is_some_and(|d| d.starved && d.interval == Duration::from_millis(100)));
        limits.hand_over_tokens(2, -1, Duration::from_millis(100), now);
        assert_eq!(limits.take_rate_token(now), None);
        assert_eq!(limits.take_rate_token(now), Some(Duration::from_micros(99_999)), "the second's moment");
        assert_eq!(limits.take_rate_token(now + Duration::from_millis(100)), None);
        let later = now + Duration::from_millis(100);
        assert!(limits.take_rate_token(later).is_some(), "two were handed over");
        // Redis away, 4 members known: the own GCRA at a quarter of the rate (one token per 400 ms).
        limits.set_token_source(false, 4, now);
        assert_eq!(limits.rate_demand(now), None);
        assert_eq!(limits.take_rate_token(now), None);
        let wait = limits.take_rate_token(now).unwrap();
        assert!(wait > Duration::from_millis(350) && wait <= Duration::from_millis(400), "{wait:?}");
    }

    #[test]
    fn a_reload_that_adds_a_rate_in_a_cluster_takes_its_tokens_from_the_cluster() {
        let now = Instant::now();
        let mut none =
            Limits::new(&LimitsConfig::default(), &QueueConfig::default(), &RetryConfig::default(), vec![], None);
        none.set_token_source(true, 3, now);
        let config = LimitsConfig { rate: Some("10/s".parse().unwrap()), burst: Some(1), ..LimitsConfig::default() };
        let mut rated = Limits::new(&config, &QueueConfig::default(), &RetryConfig::default(), vec![], Some(none));
        assert!(rated.take_rate_token(now).is_some(), "shared: none until the cluster hands some over");
        assert!(rated.rate_demand(now).is_some());
    }

    #[test]
    fn without_a_rate_nothing_scales() {
        let now = Instant::now();
        let mut limits =
            Limits::new(&LimitsConfig::default(), &QueueConfig::default(), &RetryConfig::default(), vec![], None);
        limits.rate_down(now);
        assert_eq!(limits.effective_rate(), None);
        assert_eq!(limits.take_rate_token(now), None);
        assert_eq!(limits.accounts.len(), 1, "one default account");
    }
}
