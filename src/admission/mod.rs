//! The admission stage: every upstream attempt — first tries and retries alike — waits here until its
//! lane (account × model) can take it: under the lane's learned or configured limit, its gate open (a
//! lane that was throttled probes one request at a time), its pacing, the global concurrency cap and the
//! global rate (GCRA). Waiting requests sit in a bounded fair queue with deadlines; one supervised
//! dispatcher task hands out slots in queue order, so a waiting request costs memory, not CPU. A slot is
//! an RAII `Permit` that carries the attempt's outcome back to its lane.

mod controller;
mod evidence;
mod gcra;
mod lane;
mod limits;
mod pacing;
mod probe;
mod queue;
mod quota;
mod state;
mod tokens;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

pub use controller::{Change, INITIAL_LIMIT, LATENCY_GUARD, PLATEAU};
pub use lane::{LaneKey, Signal};
pub use limits::{AccountLimits, LaneView, RateDemand, DEFAULT_ACCOUNT};
pub use pacing::{parse_go_duration, Window};
pub use probe::JITTER;
pub use queue::{ClientId, Priority, STARVATION_LIMIT};
pub use quota::{ClientLimits, ClientView, Waiting};
pub use state::{LaneDemand, OTHER_MODEL, UNKNOWN_MODEL};
pub use tokens::{TOKENS_HELD, TOKEN_HORIZON, TOKEN_LIFE};

use crate::catch_unwind::{panic_message, CatchUnwind};
use crate::config::{LimitsConfig, QueueConfig, RetryConfig};
use limits::Limits;
use quota::Quotas;
use state::{Full, Granted, State};

/// The maps admission looks up on every request (lanes, routes, waiters, clients): foldhash, seeded per
/// process, costs a fraction of the standard SipHash on these short keys (model names, numeric ids).
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What a request brings to admission.
#[derive(Debug, Clone)]
pub struct Ticket<'a> {
    /// The request's `model`, if it could be read.
    pub model: Option<&'a str>,
    /// Sent to a fallback: the one account whose lane serves it (None: the primary's accounts).
    pub pool: Option<&'a str>,
    pub client: ClientId,
    pub priority: Priority,
    /// When the request stops waiting (arrival + `queue.max_wait`, kept across retries).
    pub deadline: Instant,
    /// A retry goes to the front of its client's queue: it keeps its place ahead of newer requests.
    pub retry: bool,
    /// Where its queue entry is told (for `position`), while it waits.
    pub entry: Option<&'a Entry>,
}

/// A request's place in the queue, as `Admission::position` reads it (`NONE` when not waiting).
#[derive(Debug)]
pub struct Entry(std::sync::atomic::AtomicU64);

impl Default for Entry {
    fn default() -> Self {
        Self(AtomicU64::new(Entry::NONE))
    }
}

impl Entry {
    const NONE: u64 = u64::MAX;

    fn set(&self, id: u64) {
        self.0.store(id, Ordering::Relaxed);
    }

    fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|id| *id != Self::NONE)
    }
}

/// Why admission turned a request away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the queue is full ({depth} waiting)")]
    QueueFull { depth: usize, retry_after: u64 },
    #[error("the client's share of the queue is full ({queued} waiting)")]
    ClientQueueFull { queued: usize },
    #[error("the request's deadline passed while it waited")]
    DeadlineExceeded { retry_after: u64 },
    #[error("sluice is shutting down")]
    ShuttingDown,
    #[error("admission failed internally; the request was not sent")]
    Internal,
    #[error("no account can serve the request (every key refused or every balance out)")]
    NoAccount,
    #[error("the upstream has been unreachable for upstream.unreachable_wait")]
    Unreachable,
}

/// A point-in-time view of admission, for `/status`, metrics and tests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub queued: usize,
    pub queued_by_priority: [usize; 3],
    pub inflight: usize,
    /// Every lane in use (models with traffic, per account).
    pub lanes: Vec<LaneView>,
    /// The configured global rate limit and its burst.
    pub rate: Option<(crate::config::Rate, u32)>,
    /// The rate in force (req/s): the configured one, lowered while the learned limits are.
    pub effective_rate: Option<f64>,
    /// Each configured client's queued and in-flight requests.
    pub clients: Vec<ClientView>,
    /// Who waits of the callers that are no configured client, together.
    pub anonymous: Waiting,
    /// The global concurrency cap and the queue bound in force.
    pub max_concurrency: usize,
    pub max_depth: usize,
    /// How often the dispatcher woke up since start, and how often it failed and was restarted.
    pub dispatcher_wakeups: u64,
    pub dispatcher_restarts: u64,
}

impl Snapshot {
    /// Lanes whose gate is probing right now.
    pub fn probing_lanes(&self) -> usize {
        self.lanes.iter().filter(|l| l.probing).count()
    }

    /// Time lanes spent probing, summed over lanes.
    pub fn probing_total(&self) -> Duration {
        self.lanes.iter().map(|l| l.probing_total).sum()
    }
}

/// The handle the proxy uses; cheap to clone. The dispatcher stops when the last handle is dropped.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

/// State shared by the handles, the dispatcher and the permits.
pub struct Shared {
    state: Mutex<State>,
    /// Wakes the dispatcher: a new waiter, a released slot, an opened gate, shutdown.
    wake: Notify,
    wakeups: AtomicU64,
    restarts: AtomicU64,
    /// Set in a cluster: told of lanes' signals, and woken when demand changes.
    cluster: Mutex<Option<ClusterHook>>,
}

/// How admission tells the cluster (`cluster/`) what happens on its lanes.
#[derive(Clone)]
pub struct ClusterHook {
    /// Each attempt's signal, by lane (dropped when the cluster falls behind).
    pub signals: tokio::sync::mpsc::Sender<(LaneKey, Signal)>,
    /// Demand changed: a request queued, or a slot came back.
    pub changed: Arc<Notify>,
}

impl Shared {
    fn hook(&self) -> Option<ClusterHook> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Tells the cluster (if any) that demand changed.
    fn demand_changed(&self) {
        if let Some(hook) = self.hook() {
            hook.changed.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves counts that are still the best we have.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes admission when the last `Admission` handle goes away.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        close(&self.0);
    }
}

fn close(shared: &Shared) {
    shared.lock().closed = true;
    shared.wake.notify_one();
}

/// How long the dispatcher waits before it restarts after a failure.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Slack past a waiter's deadline before it stops waiting on its own (the dispatcher expires it first).
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

impl Admission {
    /// Builds the stage for `accounts` (empty: one default account) and starts its dispatcher on the
    /// current tokio runtime.
    pub fn new(limits: &LimitsConfig, queue: &QueueConfig, retry: &RetryConfig, accounts: Vec<AccountLimits>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(Limits::new(limits, queue, retry, accounts, None))),
            wake: Notify::new(),
            wakeups: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            cluster: Mutex::new(None),
        });
        tokio::spawn(run_dispatcher(shared.clone()));
        Self { _owner: Arc::new(Owner(shared.clone())), shared }
    }

    /// Waits for a slot. Dropping the future (the client went away) leaves the queue at once. The wait
    /// ends by the ticket's deadline even if the dispatcher never answers.
    pub async fn acquire(&self, ticket: Ticket<'_>) -> Result<Permit, Rejected> {
        let now = Instant::now();
        let (id, rx) = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Rejected::ShuttingDown);
            }
            let route = state.route_key(ticket.model, ticket.pool);
            if !state.serves(&route) {
                return Err(Rejected::NoAccount);
            }
            if let Some(granted) = state.try_take_now(&route, ticket.client, now) {
                return Ok(Permit::new(self.shared.clone(), granted));
            }
            if ticket.deadline <= now {
                return Err(Rejected::DeadlineExceeded { retry_after: state.retry_after_secs(&route, now) });
            }
            // Made only for a request that waits: the fast path above needs no channel.
            let (tx, rx) = oneshot::channel();
            match state.enqueue(route.clone(), ticket.client, ticket.priority, ticket.deadline, ticket.retry, tx) {
                Ok(id) => {
                    if let Some(entry) = ticket.entry {
                        entry.set(id);
                    }
                    (id, rx)
                }
                Err(Full::Queue) => {
                    return Err(Rejected::QueueFull {
                        depth: state.queued(),
                        retry_after: state.retry_after_secs(&route, now),
                    });
                }
                Err(Full::Client(queued)) => return Err(Rejected::ClientQueueFull { queued }),
            }
        };
        tracing::debug!(entry = id, model = ticket.model.unwrap_or(UNKNOWN_MODEL), retry = ticket.retry, "queued");
        self.shared.wake.notify_one();
        self.shared.demand_changed();
        let mut entry = QueueEntry { shared: &self.shared, id, settled: false };
        let give_up = ticket.deadline.checked_add(DEADLINE_SLACK).unwrap_or(ticket.deadline);
        let outcome = tokio::time::timeout_at(give_up, rx).await;
        if let Some(entry) = ticket.entry {
            entry.set(Entry::NONE);
        }
        match outcome {
            Ok(delivered) => {
                entry.settled = true;
                // A sender dropped without an answer: closed admission answers first, so this is a failure.
                delivered.unwrap_or(Err(Rejected::Internal))
            }
            // The dispatcher did not answer in time: leave the queue (the entry's drop) and say so.
            Err(_) => Err(Rejected::DeadlineExceeded { retry_after: 1 }),
        }
    }

    /// How many requests wait ahead of `entry` for the same route (None: it is not waiting).
    pub fn position(&self, entry: &Entry) -> Option<usize> {
        self.shared.lock().position(entry.get()?, Instant::now())
    }

    /// The queue's depth when it is at its bound (checked before reading a request's body), else None.
    pub fn full(&self) -> Option<usize> {
        let state = self.shared.lock();
        let queued = state.queued();
        (queued >= state.limits.max_depth()).then_some(queued)
    }

    /// Whether the lanes serving `model` (on `pool`, or the primary's) are throttled: probing or paused.
    pub fn throttled(&self, model: Option<&str>, pool: Option<&str>) -> bool {
        let mut state = self.shared.lock();
        let route = state.route_key(model, pool);
        state.throttled(&route)
    }

    /// Turns away everyone waiting for an upstream that cannot be reached (after `unreachable_wait`).
    /// Only the requests waiting for that upstream: those of `pool` (None: the primary's accounts).
    pub fn fail_waiting(&self, pool: Option<&str>) {
        let waiting = self.shared.lock().drain_pool(pool);
        reject(waiting, &Rejected::Unreachable);
    }

    /// Puts new limits, queue bounds, retry delays and accounts in force without disturbing queued or
    /// in-flight requests (hot reload).
    pub fn reconfigure(
        &self,
        limits: &LimitsConfig,
        queue: &QueueConfig,
        retry: &RetryConfig,
        accounts: Vec<AccountLimits>,
    ) {
        {
            let mut state = self.shared.lock();
            let previous =
                std::mem::replace(&mut state.limits, Limits::new(limits, queue, retry, accounts.clone(), None));
            let next = Limits::new(limits, queue, retry, accounts, Some(previous));
            state.reconfigure(next);
        }
        self.shared.wake.notify_one();
    }

    /// Joins a cluster: its hook hears of every lane's signals and demand.
    pub fn join_cluster(&self, hook: ClusterHook) {
        *self.shared.cluster.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// What every lane in use wants of the cluster.
    pub fn lane_demand(&self) -> Vec<LaneDemand> {
        self.shared.lock().lane_demand()
    }

    /// Whether the cluster's Redis is reachable (new lanes then wait for their first lease).
    pub fn set_cluster_reachable(&self, reachable: bool) {
        self.shared.lock().set_cluster_reachable(reachable);
    }

    /// Sets a lane's cluster allowance (the slots this instance holds leases for; None: its own limits).
    pub fn set_allowance(&self, key: &LaneKey, allowance: Option<usize>) {
        self.shared.lock().set_allowance(key, allowance);
        self.shared.wake.notify_one();
    }

    /// Whether `limits.rate`'s tokens come from the cluster's shared GCRA (Redis reachable) or from the
    /// own one, its rate divided among `members` (Redis away; 1 alone).
    pub fn set_token_source(&self, shared: bool, members: u32) {
        self.shared.lock().limits.set_token_source(shared, members, Instant::now());
        self.shared.wake.notify_one();
    }

    /// `count` tokens reserved on the cluster's shared GCRA, the first conforming `first_us` from now
    /// (negative: already), the others `interval` apart; each spent within `TOKEN_LIFE` of its moment.
    pub fn hand_over_tokens(&self, count: u32, first_us: i64, interval: Duration) {
        self.shared.lock().limits.hand_over_tokens(count, first_us, interval, Instant::now());
        self.shared.wake.notify_one();
    }

    /// What the cluster's shared GCRA needs to know (None: no rate, or tokens are not shared), and how
    /// many waiting requests a token would let go now (see `State::rate_usable`).
    /// Asking tells admission the cluster task is alive (see `TOKEN_FALLBACK`).
    pub fn rate_demand(&self) -> Option<(RateDemand, u32)> {
        let mut state = self.shared.lock();
        let now = Instant::now();
        if !state.limits.shares_rate() {
            return None;
        }
        let usable = state.rate_usable(now);
        state.limits.rate_heard(now, usable > 0);
        let demand = state.limits.rate_demand(now)?;
        Some((demand, u32::try_from(usable).unwrap_or(u32::MAX)))
    }

    /// Puts the configured clients' quotas in force (at start and on reload); what each holds is kept.
    pub fn set_clients(&self, clients: Vec<(ClientId, ClientLimits)>) {
        self.shared.lock().quotas.reconfigure(clients);
        self.shared.wake.notify_one();
    }

    /// Turns away everyone still waiting and every newcomer with `ShuttingDown` (end of a drain).
    pub fn close(&self) {
        close(&self.shared);
    }

    /// Marks an account's lanes as serving or not (a disabled key set, a paused balance).
    pub fn set_account_enabled(&self, account: &str, enabled: bool) {
        self.shared.lock().set_account_enabled(account, enabled);
        self.shared.wake.notify_one();
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.shared.lock();
        let now = Instant::now();
        let waiting = state.queue_by_client(now);
        Snapshot {
            queued: state.queued(),
            queued_by_priority: state.queued_by_priority(),
            inflight: state.inflight(),
            lanes: state.lanes(now),
            clients: state.quotas.views_with(&waiting),
            anonymous: anonymous(&state.quotas, &waiting),
            rate: state.limits.rate(),
            effective_rate: state.limits.effective_rate(),
            max_concurrency: state.limits.max_concurrency(),
            max_depth: state.limits.max_depth(),
            dispatcher_wakeups: self.shared.wakeups.load(Ordering::Relaxed),
            dispatcher_restarts: self.shared.restarts.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn inject_dispatcher_panic(&self) {
        self.shared.lock().panic_next_dispatch = true;
        self.shared.wake.notify_one();
    }
}

/// A request's place in the queue; dropping it unsettled (the client went away) removes the entry.
struct QueueEntry<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    settled: bool,
}

impl Drop for QueueEntry<'_> {
    fn drop(&mut self) {
        if !self.settled && self.shared.lock().cancel(self.id) {
            self.shared.wake.notify_one();
        }
    }
}

/// One upstream slot of a lane (and of the global cap). Report the attempt's outcome with `report`;
/// dropping the permit gives the slot back and wakes the dispatcher.
pub struct Permit {
    shared: Arc<Shared>,
    grant: Granted,
    granted: Instant,
    reported: bool,
    /// Set once the attempt was accepted: then the hold time feeds the learned limit's window.
    accepted: bool,
}

impl Permit {
    fn new(shared: Arc<Shared>, granted: Granted) -> Self {
        Self { shared, grant: granted, granted: Instant::now(), reported: false, accepted: false }
    }

    /// The model (after aliases) this slot belongs to.
    pub fn model(&self) -> &str {
        &self.grant.lane.model
    }

    /// The account this slot belongs to.
    pub fn account(&self) -> &str {
        &self.grant.lane.account
    }

    /// Whether this attempt is its lane's probe.
    pub fn probe(&self) -> bool {
        self.grant.dispatch.probe
    }

    /// Tells the lane what became of the attempt (once; later reports are ignored).
    pub fn report(&mut self, signal: Signal) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        self.accepted = matches!(signal, Signal::Accepted { .. });
        if let Some(hook) = self.shared.hook() {
            let _ = hook.signals.try_send((self.grant.lane.clone(), signal));
        }
        let reported = self.shared.lock().report(&self.grant.lane, self.grant.dispatch, signal);
        let (change, began_probing) = (reported.change, reported.began_probing);
        let (account, model) = (&*self.grant.lane.account, &*self.grant.lane.model);
        if let Some((limit, cap)) = reported.far_below {
            tracing::info!(
                account,
                model,
                limit,
                cap,
                "requests wait: the upstream takes only {limit} at once on this lane (learned), far below its cap of \
                 {cap}; /status says why per lane"
            );
        }
        match change {
            Some(Change::Decreased { from, to }) => {
                tracing::info!(account, model, from, to, "upstream throttled: the lane's limit came down")
            }
            Some(Change::Restored { to }) => {
                tracing::info!(account, model, to, "throttling was not caused by this lane's load: limit restored")
            }
            Some(Change::Increased { to }) => tracing::debug!(account, model, to, "the lane's limit went up"),
            None => {}
        }
        if began_probing {
            tracing::info!(
                account,
                model,
                "nothing of the lane gets through (throttled or failing): probing one request at a time"
            );
        }
        // With nobody waiting there is nothing to dispatch: the next request to queue wakes it.
        if reported.anyone_waiting {
            self.shared.wake.notify_one();
        }
    }

    /// The upstream's response carried rate-limit headers: pace the lane by them.
    pub fn paced(&self, window: Window) {
        self.shared.lock().paced(&self.grant.lane, window);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").field("lane", &self.grant.lane).field("probe", &self.grant.dispatch.probe).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let hold = self.accepted.then(|| self.granted.elapsed());
        let anyone_waiting = self.shared.lock().release(&self.grant, hold, self.reported);
        if anyone_waiting {
            self.shared.wake.notify_one();
        }
        self.shared.demand_changed();
    }
}

/// The dispatcher, supervised: should a step ever panic, every waiter is answered (`Internal`) rather
/// than left hanging, the failure is counted, and the dispatcher goes on.
async fn run_dispatcher(shared: Arc<Shared>) {
    loop {
        match CatchUnwind::new(dispatch_until_closed(&shared)).await {
            Ok(()) => return,
            Err(panic) => {
                shared.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    panic = panic_message(&*panic),
                    "the admission dispatcher failed; answering the queue and restarting it"
                );
                let waiting = shared.lock().drain();
                reject(waiting, &Rejected::Internal);
                // A failure that repeats must not spin: the restarted dispatcher waits a moment.
                tokio::time::sleep(RESTART_PAUSE).await;
            }
        }
    }
}

/// The dispatcher's loop: wakes on a new waiter, a released slot, a report, or the earliest of the next
/// rate token, a lane's next probe and the next deadline — never once per waiter.
async fn dispatch_until_closed(shared: &Arc<Shared>) {
    loop {
        shared.wakeups.fetch_add(1, Ordering::Relaxed);
        let (deliveries, wake_at) = {
            let mut state = shared.lock();
            if state.closed {
                let waiting = state.drain();
                drop(state);
                reject(waiting, &Rejected::ShuttingDown);
                return;
            }
            let now = Instant::now();
            let dispatched = state.dispatch(now);
            let starved = state.limits.rate_starved();
            drop(state);
            if starved {
                // The cluster task takes more of the shared rate's tokens.
                shared.demand_changed();
            }
            dispatched
        };
        // Outside the lock. A permit whose waiter is gone comes back from `send` and is dropped here,
        // which returns its slot.
        for (tx, outcome) in deliveries {
            let _ = tx.send(outcome.map(|granted| Permit::new(shared.clone(), granted)));
        }
        match wake_at {
            Some(at) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Answers drained waiters with `why`.
fn reject(waiting: Vec<state::Sender>, why: &Rejected) {
    for tx in waiting {
        let _ = tx.send(Err(why.clone()));
    }
}

#[cfg(test)]
mod tests;

/// What the callers that are no configured client have waiting, together.
fn anonymous(quotas: &Quotas, waiting: &std::collections::HashMap<ClientId, Waiting>) -> Waiting {
    let mut all = Waiting::default();
    for (_, one) in waiting.iter().filter(|(client, _)| !quotas.lists(**client)) {
        for (sum, n) in all.by_priority.iter_mut().zip(one.by_priority) {
            *sum += n;
        }
        all.oldest = all.oldest.max(one.oldest);
    }
    all
}
