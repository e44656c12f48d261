//! The admission state behind one mutex: per-model lanes (each a fair queue plus its in-flight count),
//! the waiting entries, their deadlines, the global counts, the limits (`limits.rs`), the cooldown and
//! the pacer.
//! Plain data and decisions; no tasks, no sleeps. `mod.rs` wraps it in the async API and the dispatcher.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::adaptive::Change;
use super::cooldown::Cooldown;
use super::limits::{Lane, LaneView, Limits};
use super::pacing::{Pacer, Window};
use super::queue::{ClientId, Priority};
use super::Rejected;
use crate::config::{LimitsConfig, QueueConfig, RetryConfig};

/// The lane of requests whose model could not be read (no JSON body, invalid JSON, no `model`).
pub const UNKNOWN_MODEL: &str = "unknown";
/// Model names longer than this share the unknown lane (a client cannot grow the lane map with junk).
const MAX_MODEL_NAME: usize = 128;

/// A request waiting for dispatch, and how to tell it the outcome.
pub struct Waiter {
    lane: Arc<str>,
    priority: Priority,
    tx: oneshot::Sender<Result<super::Permit, Rejected>>,
}

/// What the dispatcher must deliver after unlocking: a permit or a rejection per waiter.
pub type Delivery = (oneshot::Sender<Result<super::Permit, Rejected>>, Result<super::Permit, Rejected>);

pub struct State {
    pub limits: Limits,
    pub cooldown: Cooldown,
    pub pacer: Pacer,
    lanes: HashMap<Arc<str>, Lane>,
    /// Lanes with waiting entries, served round-robin.
    ring: VecDeque<Arc<str>>,
    waiters: HashMap<u64, Waiter>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    depth: [usize; 3],
    inflight: usize,
    next_id: u64,
    pub closed: bool,
}

impl State {
    pub fn new(limits: &LimitsConfig, queue: &QueueConfig, retry: &RetryConfig) -> Self {
        Self {
            limits: Limits::new(limits, queue, None),
            cooldown: Cooldown::new(retry.base_delay, retry.max_delay),
            pacer: Pacer::default(),
            lanes: HashMap::new(),
            ring: VecDeque::new(),
            waiters: HashMap::new(),
            deadlines: BinaryHeap::new(),
            depth: [0; 3],
            inflight: 0,
            next_id: 0,
            closed: false,
        }
    }

    /// Puts new limits in force. Queued and in-flight requests keep their place and their slots; lanes
    /// take their new caps at once (a lowered cap just admits nobody until enough slots come back).
    pub fn reconfigure(&mut self, limits: &LimitsConfig, queue: &QueueConfig, retry: &RetryConfig) {
        let previous = std::mem::replace(&mut self.limits, Limits::new(limits, queue, None));
        self.limits = Limits::new(limits, queue, Some(previous));
        let now = Instant::now();
        for (name, lane) in &mut self.lanes {
            self.limits.refit(name, lane, now);
        }
        self.cooldown.set_delays(retry.base_delay, retry.max_delay);
    }

    /// The lane a model's requests use: aliases resolved, unreadable or overlong names in `unknown`.
    pub fn lane_key(&mut self, model: Option<&str>) -> Arc<str> {
        let name = match model {
            Some(name) if name.len() <= MAX_MODEL_NAME => name,
            _ => UNKNOWN_MODEL,
        };
        let name = self.limits.alias(name);
        if let Some((key, _)) = self.lanes.get_key_value(name) {
            return key.clone();
        }
        let key: Arc<str> = Arc::from(name);
        let lane = self.limits.lane(name, Instant::now());
        self.lanes.insert(key.clone(), lane);
        key
    }

    /// Takes a slot at once if nothing waits and every limit allows it (the uncontended path).
    pub fn try_take_now(&mut self, lane: &Arc<str>, now: Instant) -> bool {
        if !self.waiters.is_empty()
            || self.blocked_until(now).is_some()
            || self.inflight >= self.limits.max_concurrency()
        {
            return false;
        }
        if self.lanes.get(lane).is_none_or(Lane::full) || self.limits.take_rate_token().is_some() {
            return false;
        }
        self.occupy(lane, now);
        true
    }

    /// Queues a waiter; `Err` when the queue is full.
    pub fn enqueue(
        &mut self,
        lane: Arc<str>,
        client: ClientId,
        priority: Priority,
        deadline: Instant,
        retry: bool,
        tx: oneshot::Sender<Result<super::Permit, Rejected>>,
    ) -> Result<u64, oneshot::Sender<Result<super::Permit, Rejected>>> {
        if self.waiters.len() >= self.limits.max_depth() {
            return Err(tx);
        }
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.lanes.entry(lane.clone()).or_default();
        entry.queue.push(priority, client, id, retry);
        entry.waiting += 1;
        if !entry.in_ring {
            entry.in_ring = true;
            self.ring.push_back(lane.clone());
        }
        self.deadlines.push(Reverse((deadline, id)));
        self.waiters.insert(id, Waiter { lane, priority, tx });
        self.depth[priority as usize] += 1;
        Ok(id)
    }

    /// Forgets a waiter whose client went away. Returns false if it was already dispatched or expired.
    pub fn cancel(&mut self, id: u64) -> bool {
        let Some(waiter) = self.remove_waiter(id) else {
            return false;
        };
        if let Some(lane) = self.lanes.get_mut(&waiter.lane) {
            if lane.queue.len() > 2 * lane.waiting + 64 {
                let waiters = &self.waiters;
                lane.queue.retain(|id| waiters.contains_key(&id));
            }
        }
        if self.deadlines.len() > 2 * self.waiters.len() + 64 {
            let waiters = &self.waiters;
            self.deadlines.retain(|Reverse((_, id))| waiters.contains_key(id));
        }
        self.forget_lane_if_idle(&waiter.lane);
        true
    }

    /// A permit came back; `hold` is how long a successful attempt held it. Returns whether anyone
    /// waits (then the dispatcher should look).
    pub fn release(&mut self, lane: &Arc<str>, hold: Option<std::time::Duration>) -> bool {
        self.inflight = self.inflight.saturating_sub(1);
        if let Some(entry) = self.lanes.get_mut(lane) {
            entry.inflight = entry.inflight.saturating_sub(1);
            if let (Some(aimd), Some(hold)) = (entry.aimd.as_mut(), hold) {
                aimd.released(hold);
            }
        }
        self.forget_lane_if_idle(lane);
        !self.waiters.is_empty()
    }

    /// The dispatcher's step: expire deadlines, then hand out slots in queue order while every limit
    /// allows. Returns what to deliver, and when to look again if not woken before (None: only a
    /// release or a new arrival can change anything).
    pub fn dispatch(&mut self, now: Instant, shared: &Arc<super::Shared>) -> (Vec<Delivery>, Option<Instant>) {
        let mut out = Vec::new();
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(waiter) = self.remove_waiter(id) {
                let retry_after = self.retry_after_secs(now);
                out.push((waiter.tx, Err(Rejected::DeadlineExceeded { retry_after })));
                self.forget_lane_if_idle(&waiter.lane);
            }
        }
        let wake = loop {
            if self.waiters.is_empty() {
                break None;
            }
            if let Some(until) = self.blocked_until(now) {
                break Some(until);
            }
            if self.inflight >= self.limits.max_concurrency() {
                break None;
            }
            let Some((lane, id)) = self.next_dispatchable() else {
                break None;
            };
            if let Some(ready_at) = self.limits.take_rate_token() {
                break Some(now + ready_at);
            }
            let taken = self.lanes.get_mut(&lane).and_then(|entry| entry.queue.pop());
            debug_assert_eq!(taken, Some(id));
            if let Some(waiter) = self.remove_waiter(id) {
                self.occupy(&lane, now);
                out.push((waiter.tx, Ok(super::Permit::new(shared.clone(), lane))));
            }
        };
        let next_deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
        let wake = match (wake, next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (out, wake)
    }

    /// Rejects everyone still waiting (shutdown).
    pub fn drain(&mut self) -> Vec<Delivery> {
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.remove_waiter(id))
            .map(|waiter| (waiter.tx, Err(Rejected::ShuttingDown)))
            .collect()
    }

    /// Seconds a rejected client should wait: what is left of the cooldown, at least one.
    pub fn retry_after_secs(&self, now: Instant) -> u64 {
        self.blocked_until(now).map_or(1, |until| (until - now).as_secs_f64().ceil() as u64).max(1)
    }

    pub fn queued(&self) -> usize {
        self.waiters.len()
    }

    pub fn queued_by_priority(&self) -> [usize; 3] {
        self.depth
    }

    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Every lane in use.
    pub fn lanes(&self) -> Vec<LaneView> {
        let mut lanes: Vec<_> = self
            .lanes
            .iter()
            .map(|(name, lane)| LaneView {
                name: name.to_string(),
                inflight: lane.inflight,
                limit: lane.limit(),
                configured: lane.cap,
            })
            .collect();
        lanes.sort_by(|a, b| a.name.cmp(&b.name));
        lanes
    }

    /// The upstream throttled a request of `lane`: the shared cooldown, and the lane's learned limit.
    ///
    /// With a learned limit, lowering it is the shared slowdown: the model's dispatch waits until enough
    /// of what is in flight has finished. The cooldown, which pauses every dispatch, is kept for an
    /// explicit Retry-After and for lanes without a learned limit (`adaptive = false`).
    pub fn throttled(&mut self, lane: &str, now: Instant, retry_after: Option<std::time::Duration>) -> Option<Change> {
        let entry = self.lanes.get_mut(lane);
        let learned = entry.and_then(|entry| {
            let inflight = entry.inflight;
            entry.aimd.as_mut().map(|aimd| aimd.throttled(now, inflight))
        });
        if retry_after.is_some() || learned.is_none() {
            self.cooldown.throttled(now, retry_after);
        }
        let change = learned.flatten();
        if matches!(change, Some(Change::Decreased { .. })) {
            self.limits.rate_down();
        }
        change
    }

    /// An attempt of `lane` succeeded after `rtt` (time to response headers).
    pub fn succeeded(&mut self, lane: &str, now: Instant, rtt: std::time::Duration) -> Option<Change> {
        self.cooldown.succeeded();
        let entry = self.lanes.get_mut(lane)?;
        let inflight = entry.inflight;
        let change = entry.aimd.as_mut()?.succeeded(now, inflight, rtt);
        if matches!(change, Some(Change::Increased { .. })) {
            self.limits.rate_up();
        }
        change
    }

    /// An upstream response carried rate-limit headers.
    pub fn paced(&mut self, now: Instant, window: Window) {
        self.pacer.observe(now, window);
    }

    /// When dispatch may resume, if it is paused (cooldown or pacing).
    fn blocked_until(&self, now: Instant) -> Option<Instant> {
        self.cooldown.blocked_until(now).max(self.pacer.blocked_until(now))
    }

    fn occupy(&mut self, lane: &Arc<str>, now: Instant) {
        self.inflight += 1;
        if let Some(entry) = self.lanes.get_mut(lane) {
            entry.inflight += 1;
        }
        self.cooldown.dispatched(now);
        self.pacer.dispatched(now);
    }

    /// The next lane (round-robin) with a live waiter and a free slot, and that waiter's id.
    fn next_dispatchable(&mut self) -> Option<(Arc<str>, u64)> {
        for _ in 0..self.ring.len() {
            let key = self.ring.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            let live = loop {
                match lane.queue.peek() {
                    Some(id) if self.waiters.contains_key(&id) => break Some(id),
                    Some(_) => {
                        lane.queue.pop();
                    }
                    None => break None,
                }
            };
            match live {
                None => {
                    lane.in_ring = false;
                    self.forget_lane_if_idle(&key);
                }
                Some(_) if lane.full() => self.ring.push_back(key),
                Some(id) => {
                    self.ring.push_back(key.clone());
                    return Some((key, id));
                }
            }
        }
        None
    }

    fn remove_waiter(&mut self, id: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        self.depth[waiter.priority as usize] -= 1;
        if let Some(lane) = self.lanes.get_mut(&waiter.lane) {
            lane.waiting -= 1;
        }
        Some(waiter)
    }

    pub fn forget_lane_if_idle(&mut self, key: &Arc<str>) {
        if self.lanes.get(key).is_some_and(|lane| lane.inflight == 0 && lane.waiting == 0 && !lane.in_ring) {
            self.lanes.remove(key);
        }
    }
}
