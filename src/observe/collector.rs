//! The metrics read at scrape time, so they can never drift: the build, the queue, every lane (model ×
//! account: in flight, the limit in force, probing) and every account (available, keys, balance).

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use std::sync::Arc;

use crate::admission::{Admission, Priority};
use crate::cluster::Cluster;
use crate::upstream::accounts::AccountView;

/// Where the accounts come from at scrape time: their views, and the low-balance mark in force.
pub type AccountsSource = Box<dyn Fn() -> (Vec<AccountView>, f64) + Send + Sync>;

/// What is read at scrape time besides admission: the accounts, and the cluster (if any).
pub struct Sources {
    pub accounts: AccountsSource,
    pub cluster: Option<Arc<Cluster>>,
}

/// Reads admission, the accounts and the cluster at scrape time.
pub struct StateCollector {
    admission: Admission,
    accounts: AccountsSource,
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

impl StateCollector {
    pub fn new(admission: Admission, sources: Sources) -> Self {
        Self { admission, accounts: sources.accounts, cluster: sources.cluster }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    model: String,
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    account: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BalanceLabels {
    account: String,
    currency: String,
}

/// One lane's figures, lanes of unconfigured models summed under their bounded label.
struct LaneRow {
    labels: LaneLabels,
    inflight: i64,
    limit: Option<i64>,
    probing: bool,
    probing_seconds: f64,
}

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut build =
            encoder.encode_descriptor("build_info", "Always 1; the version is a label", None, MetricType::Gauge)?;
        ConstGauge::new(1).encode(build.encode_family(&VersionLabels { version: env!("CARGO_PKG_VERSION") })?)?;
        let snapshot = self.admission.snapshot();
        let mut depth =
            encoder.encode_descriptor("queue_depth", "Requests waiting, by priority", None, MetricType::Gauge)?;
        for priority in Priority::ALL {
            let labels = PriorityLabels { priority: priority.as_str() };
            ConstGauge::new(snapshot.queued_by_priority[priority as usize] as i64)
                .encode(depth.encode_family(&labels)?)?;
        }
        // Lanes by bounded labels: configured models by name, the rest summed into "unknown" / "other".
        // The limit shown is the one in force (learned when adaptive, else configured).
        let mut rows: Vec<LaneRow> = Vec::new();
        for lane in &snapshot.lanes {
            let labels = LaneLabels { model: lane.label().to_string(), account: lane.account.clone() };
            let limit = lane.configured.and(lane.limit).map(|l| l as i64);
            let seconds = lane.probing_total.as_secs_f64();
            match rows.iter_mut().find(|r| r.labels == labels) {
                Some(row) => {
                    row.inflight += lane.inflight as i64;
                    row.probing |= lane.probing;
                    row.probing_seconds += seconds;
                }
                None => rows.push(LaneRow {
                    labels,
                    inflight: lane.inflight as i64,
                    limit,
                    probing: lane.probing,
                    probing_seconds: seconds,
                }),
            }
        }
        let all = LaneLabels { model: "all".into(), account: "all".into() };
        let mut inflight = encoder.encode_descriptor(
            "inflight",
            "Upstream requests in flight, by model and account",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snapshot.inflight as i64).encode(inflight.encode_family(&all)?)?;
        for row in &rows {
            ConstGauge::new(row.inflight).encode(inflight.encode_family(&row.labels)?)?;
        }
        let mut limit = encoder.encode_descriptor(
            "concurrency_limit",
            "Concurrency limit in force, by model and account: learned when adaptive, else configured (\"all\": the global cap)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snapshot.max_concurrency as i64).encode(limit.encode_family(&all)?)?;
        for row in &rows {
            if let Some(value) = row.limit {
                ConstGauge::new(value).encode(limit.encode_family(&row.labels)?)?;
            }
        }
        ConstGauge::new(snapshot.effective_rate.unwrap_or(0.0)).encode(encoder.encode_descriptor(
            "rate_limit_per_second",
            "Global rate limit in force, req/s: the configured one, lowered while learned limits are (0: none)",
            None,
            MetricType::Gauge,
        )?)?;
        let mut probing = encoder.encode_descriptor(
            "lane_probing",
            "1 while a lane (model and account) is throttled and probes one request at a time",
            None,
            MetricType::Gauge,
        )?;
        for row in &rows {
            ConstGauge::new(i64::from(row.probing)).encode(probing.encode_family(&row.labels)?)?;
        }
        let mut probing_seconds = encoder.encode_descriptor(
            "lane_probing_seconds",
            "Time lanes (model and account) spent probing after throttles",
            None,
            MetricType::Counter,
        )?;
        for row in &rows {
            ConstCounter::new(row.probing_seconds).encode(probing_seconds.encode_family(&row.labels)?)?;
        }
        encode_clients(&snapshot, &mut encoder)?;
        ConstCounter::new(super::lines_dropped()).encode(encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines (request lines and other events) dropped because the log writer fell behind",
            None,
            MetricType::Counter,
        )?)?;
        if let Some(cluster) = &self.cluster {
            encode_cluster(&cluster.view(), &mut encoder)?;
        }
        self.encode_accounts(&mut encoder)
    }
}

/// Whether this instance reaches the cluster's Redis, how many instances are alive, the round trips.
fn encode_cluster(view: &crate::cluster::View, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    ConstGauge::new(i64::from(view.connected)).encode(encoder.encode_descriptor(
        "cluster_connected",
        "1 while this instance reaches the cluster's Redis (0: local limits, its share of the last known)",
        None,
        MetricType::Gauge,
    )?)?;
    ConstGauge::new(view.members as i64).encode(encoder.encode_descriptor(
        "cluster_members",
        "Instances of the cluster alive (heartbeats), as last read",
        None,
        MetricType::Gauge,
    )?)?;
    ConstCounter::new(view.round_trips).encode(encoder.encode_descriptor(
        "cluster_redis_round_trips",
        "Calls this instance made to the cluster's Redis",
        None,
        MetricType::Counter,
    )?)?;
    Ok(())
}

/// Queued and in-flight requests per configured client, the rest as `anonymous`.
fn encode_clients(
    snapshot: &crate::admission::Snapshot,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let anonymous = (
        snapshot.queued.saturating_sub(snapshot.clients.iter().map(|c| c.queued).sum()),
        snapshot.inflight.saturating_sub(snapshot.clients.iter().map(|c| c.inflight).sum()),
    );
    let rows: Vec<(String, usize, usize)> = snapshot
        .clients
        .iter()
        .map(|c| (c.name.to_string(), c.queued, c.inflight))
        .chain([(crate::config::ANONYMOUS.to_string(), anonymous.0, anonymous.1)])
        .collect();
    let mut queued =
        encoder.encode_descriptor("client_queued", "Requests waiting, by client", None, MetricType::Gauge)?;
    for (client, count, _) in &rows {
        ConstGauge::new(*count as i64).encode(queued.encode_family(&ClientLabels { client: client.clone() })?)?;
    }
    let mut inflight = encoder.encode_descriptor(
        "client_inflight",
        "Upstream requests in flight, by client",
        None,
        MetricType::Gauge,
    )?;
    for (client, _, count) in &rows {
        ConstGauge::new(*count as i64).encode(inflight.encode_family(&ClientLabels { client: client.clone() })?)?;
    }
    Ok(())
}

impl StateCollector {
    fn encode_accounts(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (accounts, low) = (self.accounts)();
        let mut available = encoder.encode_descriptor(
            "account_available",
            "1 while the account serves: not paused for its balance, a key left",
            None,
            MetricType::Gauge,
        )?;
        for account in &accounts {
            let labels = AccountLabels { account: account.name.clone() };
            ConstGauge::new(i64::from(account.available)).encode(available.encode_family(&labels)?)?;
        }
        let mut keys =
            encoder.encode_descriptor("account_keys", "The account's keys, by state", None, MetricType::Gauge)?;
        for account in &accounts {
            let enabled = (account.keys - account.keys_disabled) as i64;
            for (state, count) in [("enabled", enabled), ("disabled", account.keys_disabled as i64)] {
                let labels = KeyLabels { account: account.name.clone(), state };
                ConstGauge::new(count).encode(keys.encode_family(&labels)?)?;
            }
        }
        let balances: Vec<(BalanceLabels, f64)> = accounts
            .iter()
            .flat_map(|a| {
                let infos = a.balance.iter().flat_map(|b| b.infos.iter());
                infos.map(|i| (BalanceLabels { account: a.name.clone(), currency: i.currency.clone() }, i.total))
            })
            .collect();
        let mut balance = encoder.encode_descriptor(
            "account_balance",
            "The account's total balance, from its latest GET /user/balance",
            None,
            MetricType::Gauge,
        )?;
        for (labels, total) in &balances {
            ConstGauge::new(*total).encode(balance.encode_family(labels)?)?;
        }
        let mut below = encoder.encode_descriptor(
            "account_balance_low",
            "1 while the account's balance is below upstream.balance.low",
            None,
            MetricType::Gauge,
        )?;
        for (labels, total) in &balances {
            ConstGauge::new(i64::from(*total < low)).encode(below.encode_family(labels)?)?;
        }
        Ok(())
    }
}
