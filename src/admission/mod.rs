//! The admission stage: every upstream attempt — first tries and retries alike — waits here for a global
//! rate token (GCRA), a global and a per-model concurrency slot, and the end of any shared cooldown.
//! Waiting requests sit in a bounded fair queue with deadlines; one dispatcher task hands out slots in
//! queue order, so a waiting request costs memory, not CPU. A slot is an RAII `Permit`.

mod adaptive;
mod cooldown;
mod limits;
mod pacing;
mod queue;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

pub use adaptive::{DECREASE, LATENCY_GUARD};
pub use cooldown::RAMP_STEPS;
pub use limits::LaneView;
pub use pacing::{parse_go_duration, Window};
pub use queue::{ClientId, Priority, STARVATION_LIMIT};
pub use state::UNKNOWN_MODEL;

use crate::config::{LimitsConfig, QueueConfig, RetryConfig};
use state::{Delivery, State};

/// What a request brings to admission.
#[derive(Debug, Clone)]
pub struct Ticket<'a> {
    /// The request's `model`, if it could be read.
    pub model: Option<&'a str>,
    pub client: ClientId,
    pub priority: Priority,
    /// When the request stops waiting (arrival + `queue.max_wait`, kept across retries).
    pub deadline: Instant,
    /// A retry goes to the front of its client's queue: it keeps its place ahead of newer requests.
    pub retry: bool,
}

/// Why admission turned a request away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the queue is full ({depth} waiting)")]
    QueueFull { depth: usize, retry_after: u64 },
    #[error("the request's deadline passed while it waited")]
    DeadlineExceeded { retry_after: u64 },
    #[error("sluice is shutting down")]
    ShuttingDown,
}

/// A point-in-time view of admission, for `/status`, metrics and tests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub queued: usize,
    pub queued_by_priority: [usize; 3],
    pub inflight: usize,
    /// Every lane in use (models with traffic and configured ones seen so far).
    pub lanes: Vec<LaneView>,
    pub cooldown_active: bool,
    pub cooldown_total: Duration,
    /// The configured global rate limit and its burst.
    pub rate: Option<(crate::config::Rate, u32)>,
    /// The rate in force (req/s): the configured one, lowered while the learned limits are.
    pub effective_rate: Option<f64>,
    /// The global concurrency cap and the queue bound in force.
    pub max_concurrency: usize,
    pub max_depth: usize,
    /// How often the dispatcher woke up since start.
    pub dispatcher_wakeups: u64,
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
    /// Wakes the dispatcher: a new waiter, a released slot, shutdown.
    wake: Notify,
    wakeups: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; should one ever, the counts are still the best we have.
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

impl Admission {
    /// Builds the stage and starts its dispatcher on the current tokio runtime.
    pub fn new(limits: &LimitsConfig, queue: &QueueConfig, retry: &RetryConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(limits, queue, retry)),
            wake: Notify::new(),
            wakeups: AtomicU64::new(0),
        });
        tokio::spawn(run_dispatcher(shared.clone()));
        Self { _owner: Arc::new(Owner(shared.clone())), shared }
    }

    /// Waits for a slot. Dropping the future (the client went away) leaves the queue at once.
    pub async fn acquire(&self, ticket: Ticket<'_>) -> Result<Permit, Rejected> {
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Rejected::ShuttingDown);
            }
            let lane = state.lane_key(ticket.model);
            if state.try_take_now(&lane, now) {
                return Ok(Permit::new(self.shared.clone(), lane));
            }
            if ticket.deadline <= now {
                state.forget_lane_if_idle(&lane);
                return Err(Rejected::DeadlineExceeded { retry_after: state.retry_after_secs(now) });
            }
            match state.enqueue(lane.clone(), ticket.client, ticket.priority, ticket.deadline, ticket.retry, tx) {
                Ok(id) => id,
                Err(_) => {
                    state.forget_lane_if_idle(&lane);
                    return Err(Rejected::QueueFull {
                        depth: state.queued(),
                        retry_after: state.retry_after_secs(now),
                    });
                }
            }
        };
        tracing::debug!(entry = id, model = ticket.model.unwrap_or(UNKNOWN_MODEL), retry = ticket.retry, "queued");
        self.shared.wake.notify_one();
        let mut entry = QueueEntry { shared: &self.shared, id, settled: false };
        let outcome = rx.await;
        entry.settled = true;
        outcome.unwrap_or(Err(Rejected::ShuttingDown))
    }

    /// Puts new limits, queue bounds and retry delays in force without disturbing queued or in-flight
    /// requests (hot reload).
    pub fn reconfigure(&self, limits: &LimitsConfig, queue: &QueueConfig, retry: &RetryConfig) {
        self.shared.lock().reconfigure(limits, queue, retry);
        self.shared.wake.notify_one();
    }

    /// Turns away everyone still waiting and every newcomer with `ShuttingDown` (end of a drain).
    pub fn close(&self) {
        close(&self.shared);
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.shared.lock();
        let now = Instant::now();
        Snapshot {
            queued: state.queued(),
            queued_by_priority: state.queued_by_priority(),
            inflight: state.inflight(),
            lanes: state.lanes(),
            cooldown_active: state.cooldown.active(now),
            cooldown_total: state.cooldown.total(),
            rate: state.limits.rate(),
            effective_rate: state.limits.effective_rate(),
            max_concurrency: state.limits.max_concurrency(),
            max_depth: state.limits.max_depth(),
            dispatcher_wakeups: self.shared.wakeups.load(Ordering::Relaxed),
        }
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

/// One upstream slot (global and per model). Dropping it gives the slot back and wakes the dispatcher.
pub struct Permit {
    shared: Arc<Shared>,
    lane: Arc<str>,
    granted: Instant,
    /// Set once the attempt succeeded: then the hold time feeds the learned limit's window.
    succeeded: bool,
}

impl Permit {
    fn new(shared: Arc<Shared>, lane: Arc<str>) -> Self {
        Self { shared, lane, granted: Instant::now(), succeeded: false }
    }

    /// The lane (model, after aliases) this slot belongs to.
    pub fn lane(&self) -> &str {
        &self.lane
    }

    /// The upstream throttled this attempt (429, or 503 overload): everyone cools down, and this
    /// model's learned limit comes down (once per window).
    pub fn throttled(&self, retry_after: Option<Duration>) {
        let change = self.shared.lock().throttled(&self.lane, Instant::now(), retry_after);
        if let Some(adaptive::Change::Decreased { from, to }) = change {
            tracing::info!(model = %self.lane, from, to, "upstream throttled: concurrency limit decreased");
        }
    }

    /// This attempt got a successful response after `rtt`: the throttle streak is over, and the learned
    /// limit may grow.
    pub fn succeeded(&mut self, rtt: Duration) {
        self.succeeded = true;
        let change = self.shared.lock().succeeded(&self.lane, Instant::now(), rtt);
        if let Some(adaptive::Change::Increased { to }) = change {
            tracing::debug!(model = %self.lane, to, "concurrency limit increased");
            self.shared.wake.notify_one();
        }
    }

    /// The upstream's response carried rate-limit headers: pace dispatch by them.
    pub fn paced(&self, window: Window) {
        self.shared.lock().paced(Instant::now(), window);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").field("lane", &self.lane).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let hold = self.succeeded.then(|| self.granted.elapsed());
        let anyone_waiting = self.shared.lock().release(&self.lane, hold);
        if anyone_waiting {
            self.shared.wake.notify_one();
        }
    }
}

/// The one dispatcher: wakes on a new waiter, a released slot, or the earliest of the next rate token,
/// the end of a cooldown and the next deadline — never once per waiter.
async fn run_dispatcher(shared: Arc<Shared>) {
    loop {
        shared.wakeups.fetch_add(1, Ordering::Relaxed);
        let (deliveries, wake_at, closed) = {
            let mut state = shared.lock();
            if state.closed {
                (state.drain(), None, true)
            } else {
                let (deliveries, wake_at) = state.dispatch(Instant::now(), &shared);
                (deliveries, wake_at, false)
            }
        };
        deliver(deliveries);
        if closed {
            return;
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

/// Sends outcomes outside the lock. A permit whose waiter is gone comes back from `send` and is dropped
/// here, which returns its slot.
fn deliver(deliveries: Vec<Delivery>) {
    for (tx, outcome) in deliveries {
        let _ = tx.send(outcome);
    }
}

#[cfg(test)]
mod tests;
