//! Several sluice instances, one account: the lanes' limits shared through Redis (or Valkey). Each lane
//! (account × model) has one learned limit, one probing state and one set of slot leases, cluster-wide
//! (`scripts.rs`): an instance dispatches only on slots it has leased (its *allowance*), so the sum of
//! requests in flight across instances never exceeds the lane's limit; one instance's 429 lowers the
//! limit (and may start probing) for all. Queues stay local; waiting costs no Redis traffic — this task
//! claims slots when demand changes (told by admission), when another instance gives slots back (pub/sub),
//! and at most every `POLL` otherwise, renewing its leases every third of `lease_ttl`.
//!
//! The global rate is one GCRA in Redis too (tokens handed over in small batches), and the configured
//! clients' token counts, refused keys and paused accounts are shared (`facts.rs`).
//!
//! Redis is a help, never a dependency: unreachable, each lane is bound by its last known limit divided
//! among the last known members (or, never connected, by its own limits), it is said once, and the task
//! reconnects by itself. Keys are `sluice:{name}:…`, expire, and hold no secrets.

mod facts;
mod rate;
mod scripts;

pub use facts::{Facts, Local, Shared, FACTS as FACTS_SCRIPT};
pub use scripts::{CLAIM as CLAIM_SCRIPT, RATE as RATE_SCRIPT};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::admission::{Admission, ClusterHook, LaneDemand, LaneKey, Signal, INITIAL_LIMIT};
use crate::config::{ClusterConfig, Config};
use scripts::Scripts;

/// The longest a lane with unmet demand waits before claiming again (when no notice came).
const POLL: Duration = Duration::from_millis(250);
/// Leases beyond demand are kept this long (a burst's next request needs no round trip).
const LINGER: Duration = Duration::from_secs(1);
/// Between two connection attempts.
const RECONNECT: Duration = Duration::from_secs(2);
/// How long a lane's keys outlive their last use.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Redis calls that take longer count as failures.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/status` and the metrics show of the cluster.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub instance: String,
    pub connected: bool,
    /// Instances alive (heartbeats), the last time it was read.
    pub members: u64,
    pub round_trips: u64,
    /// Per lane: the shared learned limit, the slots all instances hold, this instance's.
    pub lanes: Vec<LaneView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneView {
    pub account: String,
    pub model: String,
    pub limit: usize,
    pub held_by_all: usize,
    pub held_here: usize,
    pub probing: bool,
}

/// The cluster as the rest of sluice sees it.
pub struct Cluster {
    view: Mutex<View>,
}

impl Cluster {
    /// Joins the cluster of `config.cluster` (None when it has no Redis): starts the task that keeps
    /// this instance's leases, takes its rate tokens and shares its `facts`.
    pub fn start(config: &Config, admission: Admission, facts: Arc<dyn Facts>) -> Option<Arc<Self>> {
        let url = config.cluster.redis_url.as_deref()?;
        let client = match redis::Client::open(url) {
            Ok(client) => client,
            Err(err) => {
                tracing::error!("cluster.redis_url cannot be used ({err}); running as a single instance");
                return None;
            }
        };
        let instance = instance_id();
        let cluster =
            Arc::new(Self { view: Mutex::new(View { instance: instance.clone(), members: 1, ..View::default() }) });
        let (signals, signals_rx) = mpsc::channel(4096);
        let changed = Arc::new(Notify::new());
        admission.join_cluster(ClusterHook { signals, changed: changed.clone() });
        let settings = Settings::new(config, instance);
        let task = Task { cluster: Arc::downgrade(&cluster), client, admission, facts, settings };
        tokio::spawn(run(task, signals_rx, changed));
        Some(cluster)
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update<R>(&self, change: impl FnOnce(&mut View) -> R) -> R {
        change(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What the task needs of the config.
struct Settings {
    instance: String,
    prefix: String,
    ttl: Duration,
    adaptive: bool,
    min: usize,
    max_concurrency: usize,
    base: Duration,
    max: Duration,
}

impl Settings {
    fn new(config: &Config, instance: String) -> Self {
        let cluster: &ClusterConfig = &config.cluster;
        Self {
            instance,
            prefix: format!("sluice:{}", cluster.name),
            ttl: cluster.lease_ttl,
            adaptive: config.limits.adaptive,
            min: config.limits.min_concurrency.max(1) as usize,
            max_concurrency: config.limits.max_concurrency as usize,
            base: config.retry.base_delay,
            max: config.retry.max_delay,
        }
    }

    fn lane_keys(&self, lane: &LaneKey) -> [String; 4] {
        let base = format!("{}:lane:{}:{}", self.prefix, lane.account, lane.model);
        [format!("{base}:state"), format!("{base}:held"), format!("{base}:expiry"), format!("{base}:wanted")]
    }

    fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

/// This instance's name in the cluster: host, process and a random part.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id());
    format!("{}-{}-{:06x}", host.trim(), std::process::id(), random & 0xff_ffff)
}

/// What CLAIM answered: the slots leased here (what is in flight stays leased), the lane's limit, the
/// slots all instances hold, whether it probes, and how many of this instance's may serve dispatches.
struct Claim {
    held: usize,
    limit: usize,
    all: usize,
    probing: bool,
    granted: usize,
}

/// This instance's leases, per lane: how many (and how many usable), and since when it has wanted fewer.
#[derive(Default)]
struct Lease {
    held: usize,
    granted: usize,
    limit: usize,
    claimed: Option<Instant>,
    surplus_since: Option<Instant>,
}

/// What the task works with.
struct Task {
    cluster: std::sync::Weak<Cluster>,
    client: redis::Client,
    admission: Admission,
    facts: Arc<dyn Facts>,
    settings: Settings,
}

/// The task: connect, keep the leases, fall back to local limits while Redis is away.
async fn run(task: Task, mut signals: mpsc::Receiver<(LaneKey, Signal)>, changed: Arc<Notify>) {
    let Task { cluster, client, admission, facts, settings } = task;
    let scripts = Scripts::default();
    let mut leases: HashMap<LaneKey, Lease> = HashMap::new();
    let mut warned = false;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(1))
        .set_response_timeout(CALL_TIMEOUT)
        .set_number_of_retries(0);
    loop {
        let Some(this) = cluster.upgrade() else { return };
        let connected = async {
            let connection = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(settings.channel()).await?;
            Ok::<_, redis::RedisError>((connection, pubsub))
        };
        match tokio::time::timeout(CALL_TIMEOUT, connected).await {
            Ok(Ok((connection, pubsub))) => {
                tracing::info!(instance = %settings.instance, "joined the cluster's Redis");
                warned = false;
                this.update(|v| v.connected = true);
                admission.set_cluster_reachable(true);
                admission.set_token_source(true, 1);
                let session = Session {
                    settings: &settings,
                    scripts: &scripts,
                    connection,
                    admission: &admission,
                    facts: &*facts,
                    cluster: &this,
                };
                let err = session.serve(pubsub, &mut leases, &mut signals, &changed).await;
                tracing::warn!(error = %err, "lost the cluster's Redis: each lane keeps its share of the last known limit");
            }
            Ok(Err(err)) if !warned => {
                warned = true;
                tracing::warn!(error = %err, "cannot reach the cluster's Redis: serving with local limits");
            }
            _ => {}
        }
        this.update(|v| v.connected = false);
        admission.set_cluster_reachable(false);
        let members = this.view().members;
        admission.set_token_source(false, u32::try_from(members).unwrap_or(u32::MAX));
        fail_open(&admission, &leases, members);
        drop(this);
        // Signals meanwhile go nowhere (the limits are local until Redis is back).
        while signals.try_recv().is_ok() {}
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Without Redis: each lane is bound by its share of the last known limit (never connected: its own).
fn fail_open(admission: &Admission, leases: &HashMap<LaneKey, Lease>, members: u64) {
    let members = members.max(1) as usize;
    for demand in admission.lane_demand() {
        let share = leases.get(&demand.key).filter(|l| l.limit > 0).map(|l| l.limit.div_ceil(members).max(1));
        admission.set_allowance(&demand.key, share);
    }
}

/// One connection's worth of work.
struct Session<'a> {
    settings: &'a Settings,
    scripts: &'a Scripts,
    connection: ConnectionManager,
    admission: &'a Admission,
    facts: &'a dyn Facts,
    cluster: &'a Cluster,
}

impl Session<'_> {
    /// Keeps the leases until Redis fails; returns the failure.
    async fn serve(
        mut self,
        mut pubsub: redis::aio::PubSub,
        leases: &mut HashMap<LaneKey, Lease>,
        signals: &mut mpsc::Receiver<(LaneKey, Signal)>,
        changed: &Notify,
    ) -> redis::RedisError {
        let mut heartbeat = Instant::now();
        let mut messages = pubsub.on_message();
        // What was leased before this session is not known to hold: every lane claims at once.
        for lease in leases.values_mut() {
            lease.claimed = None;
            lease.granted = 0;
        }
        if let Err(err) = self.claim_all(leases, false).await {
            return err;
        }
        let mut tokens = rate::RateTurn::default();
        let mut facts = facts::FactsTurn::default();
        loop {
            if heartbeat <= Instant::now() {
                match self.heartbeat().await {
                    Ok(members) => {
                        if self.cluster.update(|v| std::mem::replace(&mut v.members, members)) != members {
                            // The own GCRA, should the task fall silent, runs at this instance's share.
                            self.admission.set_token_source(true, u32::try_from(members).unwrap_or(u32::MAX));
                        }
                    }
                    Err(err) => return err,
                }
                heartbeat = Instant::now() + self.settings.ttl / 3;
            }
            let mut released = false;
            let poll = tokens.next.map_or(POLL, |at| at.saturating_duration_since(Instant::now()));
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(poll.min(POLL).min(self.settings.ttl / 3)) => {}
                message = messages.next() => match message {
                    Some(message) if message.get_payload::<String>().is_ok_and(|p| p == "facts") => facts.share_now(),
                    Some(_) => released = true,
                    None => return redis::RedisError::from((redis::ErrorKind::IoError, "the cluster's pub/sub ended")),
                },
                Some(first) = signals.recv() => {
                    if let Err(err) = self.report(first, signals).await {
                        return err;
                    }
                }
            }
            if let Err(err) = self.claim_all(leases, released).await {
                return err;
            }
            if let Err(err) = self.take_tokens(&mut tokens).await {
                return err;
            }
            if facts.due(Instant::now()) {
                if let Err(err) = self.share_facts(&mut facts).await {
                    return err;
                }
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<u64, redis::RedisError> {
        let key = format!("{}:members", self.settings.prefix);
        let ttl = millis(self.settings.ttl);
        let mut invocation = self.scripts.member.key(key);
        invocation.arg(&self.settings.instance).arg(ttl).arg(millis(KEEP));
        self.count();
        invocation.invoke_async(&mut self.connection).await
    }

    /// Tells Redis what attempts came to, per lane (the signals waiting, summed).
    async fn report(
        &mut self,
        first: (LaneKey, Signal),
        more: &mut mpsc::Receiver<(LaneKey, Signal)>,
    ) -> Result<(), redis::RedisError> {
        if !self.settings.adaptive {
            while more.try_recv().is_ok() {}
            return Ok(());
        }
        let mut sums: HashMap<LaneKey, (u64, u64, Duration)> = HashMap::new();
        let mut next = Some(first);
        while let Some((lane, signal)) = next {
            let sum = sums.entry(lane).or_default();
            match signal {
                Signal::Accepted { .. } => sum.0 += 1,
                Signal::Throttled { retry_after } => {
                    sum.1 += 1;
                    sum.2 = sum.2.max(retry_after.unwrap_or_default());
                }
                Signal::Answered | Signal::Failed { .. } => {}
            }
            next = more.try_recv().ok();
        }
        for (lane, (accepted, throttled, retry)) in sums.into_iter().filter(|(_, s)| s.0 + s.1 > 0) {
            let [state, held, _, _] = self.settings.lane_keys(&lane);
            let mut invocation = self.scripts.signal.key(state);
            invocation.key(held).arg(accepted).arg(throttled).arg(millis(retry));
            invocation
                .arg(self.settings.min)
                .arg(self.cap(None))
                .arg(millis(self.settings.base))
                .arg(millis(self.settings.max));
            invocation.arg(millis(KEEP)).arg(self.settings.channel());
            self.count();
            let _limit: i64 = invocation.invoke_async(&mut self.connection).await?;
        }
        Ok(())
    }

    /// Claims, for every lane in use, what it wants now — when that changed, when slots came free
    /// elsewhere, or when its leases are due for renewal.
    async fn claim_all(
        &mut self,
        leases: &mut HashMap<LaneKey, Lease>,
        released: bool,
    ) -> Result<(), redis::RedisError> {
        let now = Instant::now();
        let renew = self.settings.ttl / 3;
        let demand = self.admission.lane_demand();
        let mut views = Vec::with_capacity(demand.len());
        for lane in &demand {
            let lease = leases.entry(lane.key.clone()).or_default();
            let due = lease.claimed.is_none_or(|at| now.duration_since(at) >= renew);
            let wants_more = lane.wanted > lease.granted;
            let surplus = lane.wanted < lease.held;
            lease.surplus_since = if surplus { lease.surplus_since.or(Some(now)) } else { None };
            let shed = lease.surplus_since.is_some_and(|since| now.duration_since(since) >= LINGER);
            if due
                || shed
                || (wants_more && (released || lease.claimed.is_none_or(|at| now.duration_since(at) >= POLL / 5)))
                || lane.allowance != Some(lease.granted)
            {
                // Demand that lingers keeps its leases a little (a burst's next request needs no round trip).
                let desired = if shed || !surplus { lane.wanted } else { lease.held };
                let Claim { held, limit, all, probing, granted } = self.claim(lane, desired).await?;
                lease.held = held;
                lease.granted = granted;
                lease.limit = limit;
                lease.claimed = Some(now);
                self.admission.set_allowance(&lane.key, Some(granted));
                views.push(LaneView {
                    account: lane.key.account.to_string(),
                    model: lane.key.model.to_string(),
                    limit,
                    held_by_all: all,
                    held_here: held,
                    probing,
                });
            }
        }
        if !views.is_empty() {
            self.cluster.update(|v| {
                for view in views {
                    match v.lanes.iter_mut().find(|l| l.account == view.account && l.model == view.model) {
                        Some(slot) => *slot = view,
                        None => v.lanes.push(view),
                    }
                }
            });
        }
        Ok(())
    }

    async fn claim(&mut self, lane: &LaneDemand, desired: usize) -> Result<Claim, redis::RedisError> {
        let cap = self.cap(lane.cap);
        let initial = if self.settings.adaptive { INITIAL_LIMIT.min(cap) } else { cap };
        let [state, held, expiry, wanted] = self.settings.lane_keys(&lane.key);
        let mut invocation = self.scripts.claim.key(state);
        invocation.key(held).key(expiry).key(wanted);
        invocation.arg(&self.settings.instance).arg(desired).arg(lane.inflight).arg(cap).arg(initial);
        invocation.arg(millis(self.settings.ttl)).arg(millis(KEEP)).arg(self.settings.channel());
        self.count();
        let (held, limit, all, probing, granted): (usize, usize, usize, u8, usize) =
            invocation.invoke_async(&mut self.connection).await?;
        Ok(Claim { held, limit, all, probing: probing == 1, granted })
    }

    fn cap(&self, cap: Option<usize>) -> usize {
        cap.unwrap_or(self.settings.max_concurrency).max(1)
    }

    fn count(&self) {
        self.cluster.update(|v| v.round_trips += 1);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
