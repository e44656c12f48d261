//! A lane: one account × one model, the unit DeepSeek limits and therefore the unit sluice throttles and
//! learns. It holds what is in flight, the learned limit (`controller.rs`, when adaptive), the configured
//! cap, the gate that probes after setbacks (`probe.rs`) and the pacing from rate-limit headers
//! (`pacing.rs`), and turns an attempt's outcome into their events. Plain data, no I/O.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::controller::{Change, Controller};
use super::evidence::Attempt;
use super::pacing::{Pacer, Window};
use super::probe::{Gate, Readiness};

/// Which account and model a lane is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneKey {
    pub account: Arc<str>,
    pub model: Arc<str>,
}

/// What became of an attempt, as far as its lane is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// 2xx response headers after `rtt`: the upstream took the request.
    Accepted { rtt: Duration },
    /// Another response that says nothing about capacity (a 4xx other than 429).
    Answered,
    /// 429, or 503 "overloaded": the account × model is at its limit.
    Throttled { retry_after: Option<Duration> },
    /// Another retried failure (500, 502, 504, no connection): the upstream is struggling.
    Failed { retry_after: Option<Duration> },
}

/// What the dispatcher records about one dispatch, carried by the permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// The lane's sequence number of this dispatch.
    pub seq: u64,
    /// The lane's in-flight count with this attempt.
    pub level: usize,
    /// Sent as the gate's probe.
    pub probe: bool,
    /// The lane's count of throttles when this attempt went out.
    pub throttles_before: u64,
}

impl Dispatch {
    fn attempt(&self) -> Attempt {
        Attempt { seq: self.seq, level: self.level, throttles_before: self.throttles_before }
    }
}

/// Timing rules every lane follows (from `[retry]`).
#[derive(Debug, Clone, Copy)]
pub struct Delays {
    /// The first probe gap.
    pub base: Duration,
    /// The longest probe gap, honoured Retry-After or pacing wait.
    pub max: Duration,
}

#[derive(Debug)]
pub struct Lane {
    /// The configured cap for this account × model, if any.
    pub cap: Option<usize>,
    /// The learned limit (`limits.adaptive`).
    pub controller: Option<Controller>,
    pub gate: Gate,
    pub pacer: Pacer,
    pub inflight: usize,
    next_seq: u64,
    /// Whether the account serves at all (a disabled key or paused balance sets it false).
    pub enabled: bool,
    /// The last time the lane was used: idle unconfigured lanes are the first forgotten.
    pub last_used: Instant,
    /// In a cluster: the slots this instance holds leases for (`cluster/`); they bound it, not the local
    /// learned limit (the lane's learned limit is the cluster's, in Redis).
    pub allowance: Option<usize>,
    /// Whether the log said that the learned limit fell far below the cap (said once, until it recovers).
    pub told_far_below: bool,
}

impl Lane {
    pub fn new(cap: Option<usize>, controller: Option<Controller>, now: Instant) -> Self {
        Self {
            cap,
            controller,
            gate: Gate::default(),
            pacer: Pacer::default(),
            inflight: 0,
            next_seq: 0,
            enabled: true,
            last_used: now,
            allowance: None,
            told_far_below: false,
        }
    }

    /// The limit in force: the learned one (never above the cap), else the configured cap.
    pub fn limit(&self) -> Option<usize> {
        self.controller.as_ref().map(Controller::limit).or(self.cap)
    }

    /// Free slots under the limit in force (`usize::MAX` minus in flight when only the global cap holds);
    /// in a cluster, under this instance's leases.
    pub fn headroom(&self) -> usize {
        let bound = match self.allowance {
            Some(leased) => leased,
            None => self.limit().unwrap_or(usize::MAX),
        };
        bound.saturating_sub(self.inflight)
    }

    /// Whether the lane can take a dispatch at `now`: enabled, under its limit, gate open, pacing allows.
    pub fn readiness(&self, now: Instant, delays: Delays) -> Readiness {
        if !self.enabled || self.headroom() == 0 {
            return Readiness::AfterRelease;
        }
        let paced = self.pacer.blocked_until(now);
        match (self.gate.readiness(now, delays.max), paced) {
            (Readiness::AfterRelease, _) => Readiness::AfterRelease,
            (Readiness::At(a), Some(b)) => Readiness::At(a.max(b)),
            (Readiness::At(at), None) | (Readiness::Now, Some(at)) => Readiness::At(at),
            (Readiness::Now, None) => Readiness::Now,
        }
    }

    /// Takes a slot (the caller checked readiness).
    pub fn dispatch(&mut self, now: Instant) -> (Dispatch, Option<Change>) {
        self.inflight += 1;
        self.last_used = now;
        let seq = self.next_seq;
        self.next_seq += 1;
        let probe = self.gate.dispatched(now);
        self.pacer.dispatched(now);
        let change = self.controller.as_mut().and_then(|c| c.dispatched(now, self.inflight));
        let throttles_before = self.controller.as_ref().map_or(0, Controller::throttle_count);
        (Dispatch { seq, level: self.inflight, probe, throttles_before }, change)
    }

    /// An attempt's outcome. Returns a change of the learned limit worth telling about, and whether the
    /// gate began probing.
    pub fn report(
        &mut self,
        now: Instant,
        dispatch: Dispatch,
        signal: Signal,
        delays: Delays,
    ) -> (Option<Change>, bool) {
        let was_probing = self.gate.probing();
        let change = match signal {
            Signal::Accepted { rtt } => {
                self.gate.answered(now);
                let inflight = self.inflight;
                self.controller.as_mut().and_then(|c| c.accepted(now, dispatch.attempt(), inflight, rtt))
            }
            Signal::Answered => {
                // A 4xx says nothing about capacity: probing goes on, the next probe may go.
                if dispatch.probe {
                    self.gate.probe_returned();
                }
                None
            }
            Signal::Throttled { retry_after } => {
                let change = match (&mut self.controller, dispatch.probe) {
                    (Some(c), false) => c.throttled(now, dispatch.attempt(), self.inflight, self.next_seq),
                    _ => None,
                };
                // With a learned limit, a throttle that lowered it while other attempts are still in
                // flight is answered by the lower limit: those attempts finishing is what frees capacity.
                // Every other throttle starts the gate: one that lowered nothing (fixed limits, a limit
                // already at the floor, throttling judged not ours), a lone one, a probe's, a Retry-After.
                let lowered = matches!(change, Some(Change::Decreased { .. }));
                if !lowered || self.inflight <= 1 || dispatch.probe || retry_after.is_some() {
                    self.gate.setback(now, retry_after, dispatch.probe, delays.base, delays.max);
                }
                change
            }
            Signal::Failed { retry_after } => {
                // The upstream is failing (no connection, 5xx): the lane probes, so a failing upstream sees
                // one attempt at a time however many wait. Its next success ends it.
                self.gate.setback(now, retry_after, dispatch.probe, delays.base, delays.max);
                None
            }
        };
        let began_probing = !was_probing && self.gate.probing();
        if began_probing {
            if let Some(controller) = &mut self.controller {
                controller.probing();
            }
        }
        (change, began_probing)
    }

    /// Response headers carried rate-limit information.
    pub fn paced(&mut self, now: Instant, window: Window, max: Duration) {
        self.pacer.observe(now, window, max);
    }

    /// A slot came back. `hold`: how long an accepted attempt held it; `reported`: its outcome was
    /// reported (a probe that comes back without one frees the gate for the next).
    pub fn release(&mut self, now: Instant, dispatch: Dispatch, hold: Option<Duration>, reported: bool) {
        self.inflight = self.inflight.saturating_sub(1);
        self.last_used = now;
        if dispatch.probe && !reported {
            self.gate.probe_returned();
        }
        if let Some(controller) = &mut self.controller {
            controller.released(now, hold);
        }
    }

    /// After a change of the learned limit: `(limit, cap)` when a decrease has just taken it to a quarter
    /// of the cap or less (the log says so once, until the limit is back above a quarter).
    pub fn far_below_cap(&mut self, decreased: bool) -> Option<(usize, usize)> {
        let controller = self.controller.as_ref()?;
        let (limit, cap) = (controller.limit(), controller.ceiling());
        let far = limit.saturating_mul(4) <= cap;
        let news = decreased && far && !self.told_far_below;
        self.told_far_below = far && (self.told_far_below || decreased);
        news.then_some((limit, cap))
    }

    /// A short reason why the lane holds requests back, for `/status` and logs ("" when it does not).
    pub fn why(&self, now: Instant, queued: usize) -> String {
        if !self.enabled {
            return "account disabled".into();
        }
        if self.gate.probing() {
            let wait = self.gate.next_probe().map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
            return format!(
                "probing after {} setback(s); next probe in {}",
                self.gate.streak(),
                humantime::format_duration(Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(0)))
            );
        }
        if self.pacer.blocked_until(now).is_some() {
            return "paced by the upstream's rate-limit headers".into();
        }
        match (&self.controller, self.limit()) {
            (Some(c), Some(limit)) if queued > 0 && self.inflight >= limit => {
                format!("learned limit {limit} of {} reached", c.ceiling())
            }
            (None, Some(limit)) if queued > 0 && self.inflight >= limit => format!("configured cap {limit} reached"),
            (Some(c), Some(limit)) if limit < c.ceiling() && c.slow_start() => {
                format!("learned limit {limit} of {}, growing", c.ceiling())
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests;
