//! The limits in force and the lanes they apply to: the global caps, the GCRA rate limiter (and its
//! effective rate, which follows the learned limits), per-model caps and learned limits, and the view of a
//! lane that metrics and `/status` show.

use std::collections::HashMap;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::adaptive::{Aimd, DECREASE};
use super::queue::FairQueue;
use super::UNKNOWN_MODEL;
use crate::config::{LimitsConfig, QueueConfig, Rate};

/// With a configured rate and the adaptive limit on: the share of the configured rate regained with each
/// increase of a learned limit (decreases scale it by `DECREASE`).
pub const RATE_STEP: f64 = 0.05;
/// The effective rate never drops below this share of the configured one.
pub const RATE_FLOOR: f64 = 0.1;

/// The limits in force, derived from the config.
pub struct Limits {
    max_concurrency: usize,
    max_depth: usize,
    adaptive: bool,
    min_concurrency: usize,
    caps: HashMap<String, usize>,
    aliases: HashMap<String, String>,
    /// The GCRA limiter and the (rate, burst) it was built for.
    limiter: Option<(DefaultDirectRateLimiter, Rate, u32)>,
    /// The effective rate as a share of the configured one (1.0 unless throttles lowered it).
    rate_factor: f64,
}

impl Limits {
    /// Derives the limits; `previous` lends its limiter when the rate and burst are unchanged, so a
    /// reload does not hand out a fresh burst.
    pub fn new(limits: &LimitsConfig, queue: &QueueConfig, previous: Option<Limits>) -> Self {
        let wanted = limits.rate.zip(limits.effective_burst());
        let kept = previous
            .and_then(|p| Some((p.limiter?, p.rate_factor)))
            .filter(|((_, rate, burst), _)| Some((*rate, *burst)) == wanted);
        let rate_factor = kept.as_ref().map_or(1.0, |(_, factor)| *factor);
        let limiter = kept.map(|(limiter, _)| limiter).or_else(|| {
            let (rate, burst) = wanted?;
            Some((gcra(rate, burst, 1.0)?, rate, burst))
        });
        Self {
            max_concurrency: limits.max_concurrency as usize,
            max_depth: queue.max_depth,
            adaptive: limits.adaptive,
            min_concurrency: limits.min_concurrency as usize,
            caps: limits.models.iter().map(|(name, m)| (name.clone(), m.max_concurrency as usize)).collect(),
            aliases: limits.aliases.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            limiter,
            rate_factor,
        }
    }

    fn cap(&self, model: &str) -> Option<usize> {
        self.caps.get(model).copied()
    }

    /// A new lane for a model, with its cap and (when adaptive) a learned limit starting at the cap.
    pub fn lane(&self, name: &str, now: Instant) -> Lane {
        let cap = self.cap(name);
        Lane { cap, aimd: self.aimd_for(cap, now), ..Lane::default() }
    }

    /// Fits an existing lane to these limits (reload): its cap, and its learned limit kept within the
    /// new bounds, started fresh, or dropped when adaptive is off.
    pub fn refit(&self, name: &str, lane: &mut Lane, now: Instant) {
        lane.cap = self.cap(name);
        let ceiling = lane.cap.unwrap_or(self.max_concurrency);
        lane.aimd = match lane.aimd.take() {
            Some(mut aimd) if self.adaptive => {
                aimd.set_bounds(self.min_concurrency, ceiling);
                Some(aimd)
            }
            _ => self.aimd_for(lane.cap, now),
        };
    }

    pub fn alias<'a>(&'a self, model: &'a str) -> &'a str {
        self.aliases.get(model).map_or(model, String::as_str)
    }

    /// Takes a GCRA token; `Some(wait)` when none is available yet.
    pub fn take_rate_token(&self) -> Option<std::time::Duration> {
        let (limiter, _, _) = self.limiter.as_ref()?;
        limiter.check().err().map(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// A learned limit came down: the effective rate follows (by `DECREASE`).
    pub fn rate_down(&mut self) {
        self.set_rate_factor((self.rate_factor * DECREASE).max(RATE_FLOOR));
    }

    /// A learned limit went up: the effective rate regains `RATE_STEP` of the configured one.
    pub fn rate_up(&mut self) {
        self.set_rate_factor((self.rate_factor + RATE_STEP).min(1.0));
    }

    fn set_rate_factor(&mut self, factor: f64) {
        let Some((rate, burst)) = self.rate() else { return };
        if (factor - self.rate_factor).abs() < 1e-9 {
            return;
        }
        if let Some(limiter) = gcra(rate, burst, factor) {
            self.limiter = Some((limiter, rate, burst));
            self.rate_factor = factor;
        }
    }

    /// The effective rate in requests per second, if a rate is configured.
    pub fn effective_rate(&self) -> Option<f64> {
        self.limiter.as_ref().map(|(_, rate, _)| rate.per_second() * self.rate_factor)
    }

    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// The learned limit a lane starts with: between the floor and its cap (or the global cap).
    fn aimd_for(&self, cap: Option<usize>, now: Instant) -> Option<Aimd> {
        self.adaptive.then(|| Aimd::new(self.min_concurrency, cap.unwrap_or(self.max_concurrency), now))
    }

    /// The configured rate and burst, if any.
    pub fn rate(&self) -> Option<(Rate, u32)> {
        self.limiter.as_ref().map(|(_, rate, burst)| (*rate, *burst))
    }
}

/// One model's share: its caps, what it has in flight, and who waits for it.
#[derive(Default)]
pub struct Lane {
    /// The configured cap (`limits.models`), if the model is configured.
    pub cap: Option<usize>,
    /// The learned limit, when `limits.adaptive` is on.
    pub aimd: Option<Aimd>,
    pub inflight: usize,
    pub waiting: usize,
    pub queue: FairQueue,
    pub in_ring: bool,
}

impl Lane {
    /// The limit in force: the learned one (which never exceeds the cap), else the configured cap.
    pub fn limit(&self) -> Option<usize> {
        self.aimd.as_ref().map(Aimd::limit).or(self.cap)
    }

    pub fn full(&self) -> bool {
        self.limit().is_some_and(|limit| self.inflight >= limit)
    }
}

/// A lane as the outside sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneView {
    pub name: String,
    pub inflight: usize,
    /// The limit in force (learned or configured); None: only the global cap.
    pub limit: Option<usize>,
    /// The configured cap; None for models not under `limits.models`.
    pub configured: Option<usize>,
}

impl LaneView {
    /// A bounded label for metrics and status: configured models by name, "unknown", else "other".
    pub fn label(&self) -> &str {
        if self.configured.is_some() || self.name == UNKNOWN_MODEL {
            &self.name
        } else {
            "other"
        }
    }
}

/// A GCRA limiter for `rate` scaled by `factor`, with `burst`.
fn gcra(rate: Rate, burst: u32, factor: f64) -> Option<DefaultDirectRateLimiter> {
    let quota = Quota::with_period(rate.interval().div_f64(factor))?.allow_burst(NonZeroU32::new(burst)?);
    Some(RateLimiter::direct(quota))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: &str) -> Limits {
        let config = LimitsConfig { rate: Some(rate.parse().unwrap()), burst: Some(1), ..LimitsConfig::default() };
        Limits::new(&config, &QueueConfig::default(), None)
    }

    #[test]
    fn the_effective_rate_follows_the_learned_limits_within_bounds() {
        let mut limits = limits("100/s");
        assert_eq!(limits.effective_rate(), Some(100.0));
        limits.rate_down();
        assert!((limits.effective_rate().unwrap() - 95.0).abs() < 1e-6);
        for _ in 0..200 {
            limits.rate_down();
        }
        assert!((limits.effective_rate().unwrap() - 100.0 * RATE_FLOOR).abs() < 1e-6, "the floor holds");
        for _ in 0..200 {
            limits.rate_up();
        }
        assert_eq!(limits.effective_rate(), Some(100.0), "never above the configured rate");
    }

    #[test]
    fn a_lowered_rate_spaces_tokens_further_apart() {
        let mut limits = limits("1000/s");
        assert_eq!(limits.take_rate_token(), None);
        let full_rate_wait = limits.take_rate_token().unwrap();
        for _ in 0..14 {
            limits.rate_down(); // 0.95^14 ≈ 0.49
        }
        assert_eq!(limits.take_rate_token(), None, "a rebuilt limiter starts with its burst");
        let slower_wait = limits.take_rate_token().unwrap();
        assert!(slower_wait > full_rate_wait, "{slower_wait:?} vs {full_rate_wait:?}");
    }

    #[test]
    fn without_a_rate_nothing_scales() {
        let mut limits = Limits::new(&LimitsConfig::default(), &QueueConfig::default(), None);
        limits.rate_down();
        assert_eq!(limits.effective_rate(), None);
        assert_eq!(limits.take_rate_token(), None);
    }
}
