//! The admission state behind one mutex: routes (one per model: the fair queue of its waiting requests)
//! and the lanes that serve them (one per account × model, `lane.rs`), the waiting entries and their
//! deadlines, the global counts, the limits (`limits.rs`) and the configured clients' quotas (`quota.rs`).
//! Plain data and decisions; no tasks, no sleeps. `mod.rs` wraps it in the async API and the dispatcher.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::controller::Change;
use super::lane::{Dispatch, Lane, LaneKey, Signal};
use super::limits::{AccountLimits, LaneView, Limits};
use super::pacing::Window;
use super::probe::Readiness;
use super::queue::{ClientId, FairQueue, Pick, Priority};
use super::quota::{Quotas, Turn, Waiting};
use super::{Map, Rejected};

/// The lane of requests whose model could not be read (no JSON body, invalid JSON, no `model`).
pub const UNKNOWN_MODEL: &str = "unknown";
/// Where unconfigured models go once `MAX_ROUTES` distinct ones are in use.
pub const OTHER_MODEL: &str = "other";
/// Model names longer than this share the unknown lane (a client cannot grow the lane map with junk).
const MAX_MODEL_NAME: usize = 128;
/// Distinct models kept with their own queue and lanes; idle unconfigured ones are forgotten first.
const MAX_ROUTES: usize = 256;
/// Separates a fallback route's model from its pool (`model␟account`): a client's model name cannot
/// contain it (such a name goes to the unknown route), so the two kinds of route never meet.
const POOL_SEPARATOR: char = '\u{1f}';

/// How a waiter is told its outcome.
pub type Sender = oneshot::Sender<Result<super::Permit, Rejected>>;

/// A request waiting for dispatch, and how to tell it the outcome.
pub struct Waiter {
    route: Arc<str>,
    /// When it began to wait (this time: a retry waits anew).
    since: Instant,
    priority: Priority,
    client: ClientId,
    /// Counted in its client's quota (see `Quotas::queued`).
    counted: bool,
    tx: Sender,
}

/// What the dispatcher must deliver after unlocking: a slot (to wrap in a permit) or a rejection.
pub type Delivery = (Sender, Result<Granted, Rejected>);

/// One model's waiting requests and the lanes (one per account) that serve them. A fallback's route
/// (`model@account`) is served by that one account's lane of the model — the lane the primary's route of
/// the model shares, when the account is one of the primary's.
struct Route {
    queue: FairQueue,
    waiting: usize,
    in_ring: bool,
    lanes: Vec<LaneKey>,
    /// The model its lanes serve.
    model: Arc<str>,
    /// Set for a fallback's route: the one account that serves it.
    pool: Option<Arc<str>>,
    /// Configured models are never forgotten.
    configured: bool,
}

/// A waiter ready to go: its route, its queue entry and the lane it goes to.
type Ready = (Arc<str>, Pick, LaneKey);

/// Why a request could not be queued.
pub enum Full {
    /// The queue is at `queue.max_depth`.
    Queue,
    /// The client has `max_queued` requests waiting (this many).
    Client(usize),
}

/// How often the queue positions of keep-alive comments are computed afresh.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);

/// What a report did to its lane (`State::report`).
#[derive(Debug, Default)]
pub struct Reported {
    pub change: Option<Change>,
    pub began_probing: bool,
    pub far_below: Option<(usize, usize)>,
    /// Whether anyone waits (then the dispatcher should look: the lane's limit or gate may have moved).
    pub anyone_waiting: bool,
}

/// What a lane wants of the cluster (`Admission::lane_demand`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneDemand {
    pub key: LaneKey,
    pub inflight: usize,
    /// In flight plus the waiting requests it could serve, at most its cap.
    pub wanted: usize,
    pub cap: Option<usize>,
    pub allowance: Option<usize>,
}

/// A dispatch the dispatcher (or the uncontended path) made.
pub struct Granted {
    pub lane: LaneKey,
    pub dispatch: Dispatch,
    pub client: ClientId,
    /// Counted in its client's quota (see `Quotas::took`).
    pub counted: bool,
}

pub struct State {
    pub limits: Limits,
    pub quotas: Quotas,
    routes: Map<Arc<str>, Route>,
    lanes: Map<LaneKey, Lane>,
    /// Routes with waiting entries, served round-robin.
    ring: VecDeque<Arc<str>>,
    waiters: Map<u64, Waiter>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    depth: [usize; 3],
    inflight: usize,
    next_id: u64,
    /// Breaks ties between accounts with equal headroom.
    turn: usize,
    /// Accounts that serve nothing now (their new lanes start disabled too).
    disabled: Vec<Arc<str>>,
    /// The cluster allowance a new lane starts with: `Some(0)` while a cluster's Redis is reachable (it
    /// dispatches nothing before its first lease), None otherwise (its own limits).
    new_lane_allowance: Option<usize>,
    /// Waiters' places in their routes' queues, as last computed (`position`).
    positions: Option<(Instant, HashMap<u64, usize>)>,
    pub closed: bool,
    #[cfg(test)]
    pub panic_next_dispatch: bool,
}

impl State {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            quotas: Quotas::default(),
            routes: Map::default(),
            lanes: Map::default(),
            ring: VecDeque::new(),
            waiters: Map::default(),
            deadlines: BinaryHeap::new(),
            depth: [0; 3],
            inflight: 0,
            next_id: 0,
            turn: 0,
            disabled: Vec::new(),
            new_lane_allowance: None,
            positions: None,
            closed: false,
            #[cfg(test)]
            panic_next_dispatch: false,
        }
    }

    /// Puts new limits in force. Queued and in-flight requests keep their place and their slots; lanes
    /// keep what they learned and take their new caps at once; accounts that appeared get lanes, and
    /// lanes of accounts that went away serve nothing new (their in-flight attempts finish). Every account
    /// serves again: a reload gives refused keys and paused accounts a fresh start.
    pub fn reconfigure(&mut self, limits: Limits) {
        let now = Instant::now();
        self.limits = limits;
        self.disabled.clear();
        for lane in self.lanes.values_mut() {
            lane.enabled = true;
        }
        let accounts = self.limits.accounts.clone();
        for route in self.routes.values_mut() {
            let model = route.model.clone();
            let serving: Vec<&AccountLimits> = serving(&accounts, route.pool.as_deref());
            route.lanes = serving.iter().map(|a| LaneKey { account: a.name.clone(), model: model.clone() }).collect();
            route.configured = route.pool.is_none() && (self.limits.configured(&model) || &*model == UNKNOWN_MODEL);
            for account in serving {
                let key = LaneKey { account: account.name.clone(), model: model.clone() };
                match self.lanes.get_mut(&key) {
                    Some(lane) => self.limits.refit(account, &model, lane, now),
                    None => {
                        let mut lane = self.limits.lane(account, &model, now);
                        lane.enabled = !self.disabled.contains(&account.name);
                        lane.allowance = self.new_lane_allowance;
                        self.lanes.insert(key, lane);
                    }
                }
            }
        }
        let live: Vec<Arc<str>> = accounts.iter().map(|a| a.name.clone()).collect();
        self.lanes.retain(|key, lane| lane.inflight > 0 || live.contains(&key.account));
    }

    /// The route a model's requests use: aliases resolved, unreadable or overlong names in `unknown`.
    /// With a `pool` (a fallback's account), the route that only that account's lane serves.
    pub fn route_key(&mut self, model: Option<&str>, pool: Option<&str>) -> Arc<str> {
        let name = match model {
            Some(name) if name.len() <= MAX_MODEL_NAME && !name.contains(POOL_SEPARATOR) => name,
            _ => UNKNOWN_MODEL,
        };
        let name = self.limits.alias(name);
        if let Some(pool) = pool {
            return self.pool_route(name.to_string(), pool);
        }
        if let Some((key, _)) = self.routes.get_key_value(name) {
            return key.clone();
        }
        let configured = self.limits.configured(name) || name == UNKNOWN_MODEL;
        let name: Arc<str> = Arc::from(name);
        // Past the bound, an unconfigured model shares the `other` route (made once, even over the bound).
        let key = if !configured && self.routes.len() >= MAX_ROUTES && !self.forget_an_idle_route() {
            if let Some((key, _)) = self.routes.get_key_value(OTHER_MODEL) {
                return key.clone();
            }
            Arc::from(OTHER_MODEL)
        } else {
            name
        };
        let now = Instant::now();
        let mut lanes = Vec::new();
        for account in serving(&self.limits.accounts, None) {
            let lane = LaneKey { account: account.name.clone(), model: key.clone() };
            if !self.lanes.contains_key(&lane) {
                let new = self.new_lane(account, &key, now);
                self.lanes.insert(lane.clone(), new);
            }
            lanes.push(lane);
        }
        let model = key.clone();
        let route =
            Route { queue: FairQueue::default(), waiting: 0, in_ring: false, lanes, model, pool: None, configured };
        self.routes.insert(key.clone(), route);
        key
    }

    /// The route of `model` served by `pool` alone (a fallback's account): `model@pool`.
    fn pool_route(&mut self, model: String, pool: &str) -> Arc<str> {
        let name = format!("{model}{POOL_SEPARATOR}{pool}");
        if let Some((key, _)) = self.routes.get_key_value(name.as_str()) {
            return key.clone();
        }
        let configured = self.limits.configured(&model);
        if self.routes.len() >= MAX_ROUTES && !self.forget_an_idle_route() && !configured && model != OTHER_MODEL {
            // Past the bound, an unconfigured model shares the pool's `other` route.
            return self.pool_route(OTHER_MODEL.to_string(), pool);
        }
        let key: Arc<str> = Arc::from(name);
        let model: Arc<str> = Arc::from(model);
        let now = Instant::now();
        let mut lanes = Vec::new();
        if let Some(account) = self.limits.accounts.iter().find(|a| &*a.name == pool) {
            let lane = LaneKey { account: account.name.clone(), model: model.clone() };
            if !self.lanes.contains_key(&lane) {
                let new = self.new_lane(account, &model, now);
                self.lanes.insert(lane.clone(), new);
            }
            lanes.push(lane);
        }
        let pool = Some(Arc::from(pool));
        let route =
            Route { queue: FairQueue::default(), waiting: 0, in_ring: false, lanes, model, pool, configured: false };
        self.routes.insert(key.clone(), route);
        key
    }

    /// Forgets the unconfigured route idle the longest; false when none is idle.
    fn forget_an_idle_route(&mut self) -> bool {
        let lanes = &self.lanes;
        let idle = |route: &Route| {
            !route.configured
                && route.waiting == 0
                && !route.in_ring
                && route.lanes.iter().all(|k| lanes.get(k).is_none_or(|l| l.inflight == 0))
        };
        let last_used = |route: &Route| route.lanes.iter().filter_map(|k| lanes.get(k)).map(|l| l.last_used).max();
        let oldest =
            self.routes.iter().filter(|(_, r)| idle(r)).min_by_key(|(_, r)| last_used(r)).map(|(k, _)| k.clone());
        let Some(key) = oldest else { return false };
        if let Some(route) = self.routes.remove(&key) {
            // A lane may serve several routes (a fallback's and the primary's): kept while one uses it.
            for lane in route.lanes {
                if !self.routes.values().any(|r| r.lanes.contains(&lane)) {
                    self.lanes.remove(&lane);
                }
            }
        }
        true
    }

    /// Takes a slot at once if nothing waits and every limit allows it (the uncontended path).
    pub fn try_take_now(&mut self, route: &Arc<str>, client: ClientId, now: Instant) -> Option<Granted> {
        if !self.waiters.is_empty()
            || self.inflight >= self.limits.max_concurrency()
            || self.quotas.turn(client, now) != Turn::Now
        {
            return None;
        }
        let lane = self.best_lane(route, now).ok()?;
        if self.limits.take_rate_token(now).is_some() {
            return None;
        }
        Some(self.occupy(lane, client, now))
    }

    /// Queues a waiter; `Err` when the queue (or the client's share of it: not for a retry, which was
    /// counted when it first came) is full.
    pub fn enqueue(
        &mut self,
        route: Arc<str>,
        client: ClientId,
        priority: Priority,
        deadline: Instant,
        retry: bool,
        tx: Sender,
    ) -> Result<u64, Full> {
        if self.waiters.len() >= self.limits.max_depth() {
            return Err(Full::Queue);
        }
        if !retry {
            self.quotas.may_queue(client).map_err(Full::Client)?;
        }
        let Some(entry) = self.routes.get_mut(&route) else { return Err(Full::Queue) };
        let id = self.next_id;
        self.next_id += 1;
        entry.queue.push(priority, client, id, retry);
        entry.waiting += 1;
        if !entry.in_ring {
            entry.in_ring = true;
            self.ring.push_back(route.clone());
        }
        self.deadlines.push(Reverse((deadline, id)));
        let counted = self.quotas.queued(client);
        let since = Instant::now();
        self.waiters.insert(id, Waiter { route, since, priority, client, counted, tx });
        self.depth[priority as usize] += 1;
        Ok(id)
    }

    /// Forgets a waiter whose client went away. Returns false if it was already dispatched or expired.
    pub fn cancel(&mut self, id: u64) -> bool {
        let Some(waiter) = self.remove_waiter(id) else {
            return false;
        };
        self.compact_route(&waiter.route);
        self.compact_deadlines();
        true
    }

    /// Drops a route's abandoned queue entries once they outnumber its waiters (cancelled or expired
    /// entries of a client held by its quota are not reached by dispatch).
    fn compact_route(&mut self, route: &str) {
        if let Some(route) = self.routes.get_mut(route) {
            if route.queue.len() > 2 * route.waiting + 64 {
                let waiters = &self.waiters;
                route.queue.retain(|id| waiters.contains_key(&id));
            }
        }
    }

    /// Drops the deadlines of entries no longer waiting once they outnumber the waiters (bounded memory).
    fn compact_deadlines(&mut self) {
        if self.deadlines.len() > 2 * self.waiters.len() + 64 {
            let waiters = &self.waiters;
            self.deadlines.retain(|Reverse((_, id))| waiters.contains_key(id));
        }
    }

    /// An attempt's outcome reached its lane. Returns a change of the learned limit and whether the lane
    /// began probing (both worth a log line).
    /// Returns the change of the lane's limit, whether it began probing, and — once, when the learned
    /// limit has just fallen to a quarter of its cap or less — `(limit, cap)`.
    pub fn report(&mut self, lane: &LaneKey, dispatch: Dispatch, signal: Signal) -> Reported {
        let now = Instant::now();
        let delays = self.limits.delays;
        let anyone_waiting = self.queued() > 0;
        let Some(entry) = self.lanes.get_mut(lane) else { return Reported { anyone_waiting, ..Reported::default() } };
        let (change, began_probing) = entry.report(now, dispatch, signal, delays);
        let decreased = matches!(change, Some(Change::Decreased { .. }));
        let far_below = if change.is_some() { entry.far_below_cap(decreased) } else { None };
        match change {
            Some(Change::Decreased { .. }) => self.limits.rate_down(now),
            Some(Change::Increased { .. } | Change::Restored { .. }) => self.limits.rate_up(now),
            None => {}
        }
        Reported { change, began_probing, far_below, anyone_waiting }
    }

    /// Response headers of an attempt on `lane` carried rate-limit information.
    pub fn paced(&mut self, lane: &LaneKey, window: Window) {
        let max = self.limits.delays.max;
        if let Some(entry) = self.lanes.get_mut(lane) {
            entry.paced(Instant::now(), window, max);
        }
    }

    /// A permit came back. Returns whether anyone waits (then the dispatcher should look).
    pub fn release(&mut self, granted: &Granted, hold: Option<Duration>, reported: bool) -> bool {
        let (lane, dispatch) = (&granted.lane, granted.dispatch);
        self.inflight = self.inflight.saturating_sub(1);
        self.quotas.released(granted.client, granted.counted);
        if let Some(entry) = self.lanes.get_mut(lane) {
            entry.release(Instant::now(), dispatch, hold, reported);
            let gone = !self.limits.accounts.iter().any(|a| a.name == lane.account);
            if gone && entry.inflight == 0 {
                self.lanes.remove(lane);
            }
        }
        !self.waiters.is_empty()
    }

    /// The dispatcher's step: expire deadlines, then hand out slots in queue order while every limit
    /// allows. Returns what to deliver (as grants to wrap in permits), and when to look again if not woken
    /// before (None: only a release or a new arrival can change anything).
    pub fn dispatch(&mut self, now: Instant) -> (Vec<Delivery>, Option<Instant>) {
        #[cfg(test)]
        if std::mem::take(&mut self.panic_next_dispatch) {
            panic!("injected dispatcher failure");
        }
        let mut out = Vec::new();
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(waiter) = self.remove_waiter(id) {
                let retry_after = self.retry_after_secs(&waiter.route, now);
                self.compact_route(&waiter.route);
                out.push((waiter.tx, Err(Rejected::DeadlineExceeded { retry_after })));
            }
        }
        // Routes no account can serve (every key refused, every balance out): their waiters are told now.
        let unserved: Vec<Arc<str>> = self.ring.iter().filter(|route| !self.serves(route)).cloned().collect();
        for route in unserved {
            while let Some(id) = self.routes.get_mut(&route).and_then(|r| r.queue.pop()) {
                if let Some(waiter) = self.remove_waiter(id) {
                    out.push((waiter.tx, Err(Rejected::NoAccount)));
                }
            }
        }
        let wake = loop {
            if self.waiters.is_empty() || self.inflight >= self.limits.max_concurrency() {
                break None;
            }
            let (next, blocked_until) = self.next_dispatchable(now);
            let Some((route, pick, lane)) = next else {
                break blocked_until;
            };
            if let Some(wait) = self.limits.take_rate_token(now) {
                // The route keeps its turn for when the token comes.
                if let Some(route) = self.ring.pop_back() {
                    self.ring.push_front(route);
                }
                break now.checked_add(wait);
            }
            let taken = self.routes.get_mut(&route).and_then(|r| r.queue.take(pick));
            if taken != Some(pick.id) {
                // The queue and the waiter map disagree; skip the entry rather than stall.
                tracing::error!(entry = pick.id, "admission queue out of step; entry skipped");
                continue;
            }
            if let Some(waiter) = self.remove_waiter(pick.id) {
                let granted = self.occupy(lane, waiter.client, now);
                out.push((waiter.tx, Ok(granted)));
            }
        };
        self.compact_deadlines();
        let next_deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
        let wake = match (wake, next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (out, wake)
    }

    /// Takes everyone waiting on routes of `pool` (None: the primary's) out of the queue, to be answered.
    pub fn drain_pool(&mut self, pool: Option<&str>) -> Vec<Sender> {
        let routes = &self.routes;
        let of_pool = |route: &Arc<str>| routes.get(route).is_some_and(|r| r.pool.as_deref() == pool);
        let ids: Vec<u64> = self.waiters.iter().filter(|(_, w)| of_pool(&w.route)).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.remove_waiter(id)).map(|waiter| waiter.tx).collect()
    }

    /// Takes everyone still waiting out of the queue (shutdown, or a dispatcher failure), to be answered.
    pub fn drain(&mut self) -> Vec<Sender> {
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.remove_waiter(id)).map(|waiter| waiter.tx).collect()
    }

    /// How many requests wait ahead of entry `id` for its route (those that came before it). Computed for
    /// every waiter in one pass at most once a `POSITIONS_EVERY` (or when `id` is newer than the last
    /// pass): keep-alive comments of 10,000 waiters cost one sort a second, not a scan each.
    pub fn position(&mut self, id: u64, now: Instant) -> Option<usize> {
        let waiting = self.waiters.contains_key(&id);
        let known = self.positions.as_ref().is_some_and(|(at, ranks)| {
            now.saturating_duration_since(*at) < POSITIONS_EVERY && (ranks.contains_key(&id) || !waiting)
        });
        if !known {
            let mut by_route: HashMap<&Arc<str>, Vec<u64>> = HashMap::new();
            for (id, waiter) in &self.waiters {
                by_route.entry(&waiter.route).or_default().push(*id);
            }
            let mut ranks = HashMap::with_capacity(self.waiters.len());
            for ids in by_route.values_mut() {
                ids.sort_unstable();
                ranks.extend(ids.iter().enumerate().map(|(rank, id)| (*id, rank)));
            }
            self.positions = Some((now, ranks));
        }
        waiting.then(|| self.positions.as_ref().and_then(|(_, ranks)| ranks.get(&id).copied())).flatten()
    }

    /// Who waits: per client, how many by priority and the longest wait so far.
    pub fn queue_by_client(&self, now: Instant) -> HashMap<ClientId, Waiting> {
        let mut clients: HashMap<ClientId, Waiting> = HashMap::new();
        for waiter in self.waiters.values() {
            let waiting = clients.entry(waiter.client).or_default();
            waiting.by_priority[waiter.priority as usize] += 1;
            let waited = now.saturating_duration_since(waiter.since);
            waiting.oldest = Some(waiting.oldest.map_or(waited, |w| w.max(waited)));
        }
        clients
    }

    /// Whether some account can serve `route` (a lane of it is enabled).
    pub fn serves(&self, route: &str) -> bool {
        self.routes.get(route).is_some_and(|r| r.lanes.iter().any(|k| self.lanes.get(k).is_some_and(|l| l.enabled)))
    }

    /// Whether a lane of `route` is throttled (its gate probing).
    pub fn throttled(&self, route: &str) -> bool {
        self.routes
            .get(route)
            .is_some_and(|r| r.lanes.iter().any(|k| self.lanes.get(k).is_some_and(|l| l.gate.probing())))
    }

    /// The waiting requests of the routes each lane serves.
    fn waiting_by_lane(&self) -> HashMap<&LaneKey, usize> {
        let mut waiting: HashMap<&LaneKey, usize> = HashMap::new();
        for route in self.routes.values().filter(|r| r.waiting > 0) {
            for key in &route.lanes {
                *waiting.entry(key).or_default() += route.waiting;
            }
        }
        waiting
    }

    /// How many waiting requests a rate token would let go now: per lane ready now (enabled, gate open,
    /// pacing allowing), its waiting requests within its headroom (in a cluster, its leases), all within
    /// the queue and the global cap's room.
    pub fn rate_usable(&self, now: Instant) -> usize {
        let ready = |lane: &&Lane| lane.readiness(now, self.limits.delays) == Readiness::Now;
        let lanes: usize = self
            .waiting_by_lane()
            .into_iter()
            .filter_map(|(key, waiting)| self.lanes.get(key).filter(ready).map(|l| waiting.min(l.headroom())))
            .fold(0, usize::saturating_add);
        let room = self.limits.max_concurrency().saturating_sub(self.inflight);
        lanes.min(self.queued()).min(room)
    }

    /// What every lane in use wants of a cluster: in flight, and in flight plus the waiting requests of
    /// the routes it serves (bounded by its cap).
    pub fn lane_demand(&self) -> Vec<LaneDemand> {
        let waiting = self.waiting_by_lane();
        self.lanes
            .iter()
            .filter(|(_, lane)| lane.enabled)
            .map(|(key, lane)| {
                let wanted = lane.inflight.saturating_add(waiting.get(key).copied().unwrap_or(0));
                LaneDemand {
                    key: key.clone(),
                    inflight: lane.inflight,
                    wanted: lane.cap.map_or(wanted, |cap| wanted.min(cap)),
                    cap: lane.cap,
                    allowance: lane.allowance,
                }
            })
            .collect()
    }

    /// A lane of `account` for `model`: serving unless the account is disabled; in a reachable cluster,
    /// with no allowance until its first lease.
    fn new_lane(&self, account: &AccountLimits, model: &str, now: Instant) -> Lane {
        let mut lane = self.limits.lane(account, model, now);
        lane.enabled = !self.disabled.contains(&account.name);
        lane.allowance = self.new_lane_allowance;
        lane
    }

    /// Whether a cluster's Redis is reachable: new lanes then wait for their first lease, and lanes still
    /// on their own limits keep what they have in flight but dispatch nothing new until then.
    pub fn set_cluster_reachable(&mut self, reachable: bool) {
        self.new_lane_allowance = reachable.then_some(0);
        if reachable {
            for lane in self.lanes.values_mut().filter(|lane| lane.allowance.is_none()) {
                lane.allowance = Some(lane.inflight);
            }
        }
    }

    /// Sets a lane's cluster allowance (None: the lane is bound by its own limits again).
    pub fn set_allowance(&mut self, key: &LaneKey, allowance: Option<usize>) {
        if let Some(lane) = self.lanes.get_mut(key) {
            lane.allowance = allowance;
        }
    }

    /// Marks every lane of `account` as serving or not.
    pub fn set_account_enabled(&mut self, account: &str, enabled: bool) {
        self.disabled.retain(|a| &**a != account);
        if !enabled {
            self.disabled.push(Arc::from(account));
        }
        for (key, lane) in &mut self.lanes {
            if &*key.account == account {
                lane.enabled = enabled;
            }
        }
    }

    /// Seconds a rejected client of `route` should wait: until its lanes' next probe, at least one.
    pub fn retry_after_secs(&self, route: &str, now: Instant) -> u64 {
        let next_probe = self
            .routes
            .get(route)
            .into_iter()
            .flat_map(|r| &r.lanes)
            .filter_map(|key| self.lanes.get(key)?.gate.next_probe())
            .min();
        next_probe.map_or(1, |at| at.saturating_duration_since(now).as_secs_f64().ceil() as u64).max(1)
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

    /// Every lane in use, sorted by model then account.
    pub fn lanes(&self, now: Instant) -> Vec<LaneView> {
        let mut views: Vec<LaneView> = self
            .lanes
            .iter()
            .map(|(key, lane)| {
                let queued = self.routes.get(&key.model).map_or(0, |r| r.waiting);
                LaneView {
                    account: key.account.to_string(),
                    name: key.model.to_string(),
                    inflight: lane.inflight,
                    limit: lane.limit(),
                    configured: lane.cap,
                    probing: lane.gate.probing(),
                    probing_total: lane.gate.total(now),
                    why: lane.why(now, queued),
                }
            })
            .collect();
        views.sort_by(|a, b| (&a.name, &a.account).cmp(&(&b.name, &b.account)));
        views
    }

    fn occupy(&mut self, lane: LaneKey, client: ClientId, now: Instant) -> Granted {
        self.inflight += 1;
        let counted = self.quotas.took(client, now);
        let dispatch = match self.lanes.get_mut(&lane) {
            Some(entry) => entry.dispatch(now).0,
            None => Dispatch { seq: 0, level: 1, probe: false, throttles_before: 0 }, // never: lanes outlive routes
        };
        Granted { lane, dispatch, client, counted }
    }

    /// The lane of `route` to dispatch to now: the one with the most headroom among those ready
    /// (weighted, ties taken in turn). `Err` carries when one may be ready (None: after a release).
    fn best_lane(&mut self, route: &Arc<str>, now: Instant) -> Result<LaneKey, Option<Instant>> {
        let Some(entry) = self.routes.get(route) else { return Err(None) };
        let mut best: Option<(usize, &LaneKey)> = None;
        let mut wake: Option<Instant> = None;
        let n = entry.lanes.len();
        for i in 0..n {
            let key = &entry.lanes[(i + self.turn) % n];
            let Some(lane) = self.lanes.get(key) else { continue };
            match lane.readiness(now, self.limits.delays) {
                Readiness::Now => {
                    let weight = self.limits.accounts.iter().find(|a| a.name == key.account).map_or(1, |a| a.weight);
                    let score = lane.headroom().min(usize::MAX / 1024).saturating_mul(weight.max(1) as usize);
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, key));
                    }
                }
                Readiness::At(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Readiness::AfterRelease => {}
            }
        }
        match best {
            Some((_, key)) => {
                let key = key.clone();
                self.turn = self.turn.wrapping_add(1);
                Ok(key)
            }
            None => Err(wake),
        }
    }

    /// The next route (round-robin) with a live waiter whose client's quota lets it go, and a ready lane:
    /// the route, the waiter's entry and the lane. Otherwise, when a blocked route may become ready.
    fn next_dispatchable(&mut self, now: Instant) -> (Option<Ready>, Option<Instant>) {
        let mut wake: Option<Instant> = self.quotas.next_turn(now);
        for _ in 0..self.ring.len() {
            let Some(key) = self.ring.pop_front() else { break };
            let quotas = &self.quotas;
            let free = |client: ClientId| quotas.turn(client, now) == Turn::Now;
            let Some(route) = self.routes.get_mut(&key) else { continue };
            let live = loop {
                match route.queue.peek_where(free) {
                    Some(pick) if self.waiters.contains_key(&pick.id) => break Some(pick),
                    Some(pick) => {
                        route.queue.take(pick);
                    }
                    None => break None,
                }
            };
            let Some(pick) = live else {
                // Nothing it can dispatch now: it stays in the ring while clients held by quota wait.
                if route.waiting > 0 {
                    self.ring.push_back(key);
                } else {
                    route.in_ring = false;
                }
                continue;
            };
            self.ring.push_back(key.clone());
            match self.best_lane(&key, now) {
                Ok(lane) => return (Some((key, pick, lane)), None),
                Err(Some(at)) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Err(None) => {}
            }
        }
        (None, wake)
    }

    fn remove_waiter(&mut self, id: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        self.depth[waiter.priority as usize] -= 1;
        self.quotas.unqueued(waiter.client, waiter.counted);
        if let Some(route) = self.routes.get_mut(&waiter.route) {
            route.waiting = route.waiting.saturating_sub(1);
        }
        Some(waiter)
    }
}

/// The accounts that serve a route: the primary's (not a fallback's own) or the pool's one account.
fn serving<'a>(accounts: &'a [AccountLimits], pool: Option<&str>) -> Vec<&'a AccountLimits> {
    match pool {
        None => accounts.iter().filter(|a| !a.fallback_only).collect(),
        Some(pool) => accounts.iter().filter(|a| &*a.name == pool).collect(),
    }
}
