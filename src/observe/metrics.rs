//! Prometheus metrics (prometheus-client; OpenMetrics text), declared here beside the events that feed
//! them. Request, attempt, retry, timing and token metrics are recorded as things happen; queue depth,
//! lanes and accounts are read at scrape time (`collector.rs`), so they can never drift.
//! Label values are bounded: a model is its configured name, "unknown" or "other"; an account is a
//! configured name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::cache_metrics::CacheMetrics;
use super::client_metrics::ClientMetrics;
use super::collector::{Sources, StateCollector};
use super::counters::Counters;
use super::recent::{Recent, RecentSummary};
use super::usage::Usage;
use crate::admission::{Admission, UNKNOWN_MODEL};
use crate::config::LimitsConfig;

/// How a request ended, for `sluice_requests_total{outcome}` (a fixed set).
pub const OUTCOMES: [&str; 12] = [
    "success",
    "client_error",
    "upstream_error",
    "upstream_unreachable",
    "upstream_timeout",
    "queue_full",
    "deadline_exceeded",
    "shutting_down",
    "rejected",
    "internal_error",
    "cancelled",
    "quota_exceeded",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: &'static str,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    from: String,
    to: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: &'static str,
    account: String,
}

/// The model label: the configured model (aliases resolved), "unknown" when unreadable, else "other".
pub fn model_label(model: Option<&str>, limits: &LimitsConfig) -> String {
    let Some(model) = model else { return UNKNOWN_MODEL.to_string() };
    let model = limits.aliases.get(model).map_or(model, String::as_str);
    if limits.models.contains_key(model) {
        model.to_string()
    } else {
        "other".to_string()
    }
}

/// Totals since start, for `/status` (the Prometheus families are for scraping).
#[derive(Debug, Default)]
pub struct Totals {
    pub requests: [AtomicU64; OUTCOMES.len()],
    pub attempts: AtomicU64,
    pub throttled: AtomicU64,
    pub absorbed_429: AtomicU64,
    pub retries: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

/// Every metric sluice keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Counters<RequestLabels>,
    attempts: Counters<StatusLabels>,
    absorbed_429: Counter,
    retries: Family<ReasonLabels, Counter>,
    stream_errors: Counter,
    fallbacks: Family<FallbackLabels, Counter>,
    resumes: Family<ReasonLabels, Counter>,
    panics: Counter,
    queue_wait: Histogram,
    ttfb: Histogram,
    duration: Histogram,
    tokens: Counters<TokenLabels>,
    /// The response cache's own metrics (in the same registry).
    pub cache: Arc<CacheMetrics>,
    /// Per configured client (and `anonymous`).
    pub clients: ClientMetrics,
    pub totals: Totals,
    recent: Mutex<Recent>,
    pub started: Instant,
}

const WAIT_BUCKETS: [f64; 15] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const LATENCY_BUCKETS: [f64; 14] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

impl Metrics {
    /// Registers every metric (the cache's among them); `admission` and `sources` are read at scrape time.
    pub fn new(admission: Admission, sources: Sources, cache: Arc<CacheMetrics>) -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let metrics = Self {
            requests: Counters::default(),
            attempts: Counters::default(),
            absorbed_429: Counter::default(),
            retries: Family::default(),
            stream_errors: Counter::default(),
            fallbacks: Family::default(),
            resumes: Family::default(),
            panics: Counter::default(),
            queue_wait: Histogram::new(WAIT_BUCKETS),
            ttfb: Histogram::new(LATENCY_BUCKETS),
            duration: Histogram::new(LATENCY_BUCKETS),
            tokens: Counters::default(),
            cache,
            clients: ClientMetrics::default(),
            totals: Totals::default(),
            recent: Mutex::new(Recent::default()),
            started: Instant::now(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by final outcome and model", metrics.requests.family());
        registry.register("upstream_attempts", "Upstream attempts by response status", metrics.attempts.family());
        registry.register(
            "upstream_429_absorbed",
            "Upstream 429s that were retried and whose request then succeeded",
            metrics.absorbed_429.clone(),
        );
        registry.register("retries", "Retries by reason", metrics.retries.clone());
        registry.register(
            "stream_errors",
            "Responses whose upstream broke or stalled mid-way",
            metrics.stream_errors.clone(),
        );
        registry.register(
            "fallbacks",
            "Requests moved from one upstream to the next, by reason",
            metrics.fallbacks.clone(),
        );
        registry.register(
            "stream_resumes",
            "Broken streams continued by chat prefix completion, by result (resumed, refused)",
            metrics.resumes.clone(),
        );
        registry.register(
            "panics",
            "Requests that hit a bug inside sluice and were answered 500 sluice_internal_error",
            metrics.panics.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a request spent waiting for admission and in backoff",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "upstream_ttfb_seconds",
            "Time from sending an upstream attempt to its response headers",
            metrics.ttfb.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response body",
            metrics.duration.clone(),
        );
        registry.register("tokens", "Tokens by model and kind, from responses' usage", metrics.tokens.family());
        metrics.cache.register(&mut registry);
        metrics.clients.register(&mut registry);
        registry.register_collector(Box::new(StateCollector::new(admission, sources)));
        Self { registry, ..metrics }
    }

    /// The last minute, for `/status`.
    pub fn recent_summary(&self) -> RecentSummary {
        self.recent().summary()
    }

    /// The recent window; a panic elsewhere while it was held leaves counts that are still the best we have.
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exposition for `/metrics`, in the Prometheus text format (0.0.4).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(openmetrics_to_prometheus(&text))
    }

    /// A request of `client` got its response (or sluice's error): its outcome and how long it waited.
    pub fn request_answered(
        &self,
        outcome: &'static str,
        model: &str,
        client: &str,
        waited: Duration,
        absorbed_429: u32,
    ) {
        self.requests.inc_by([outcome, model, ""], 1, || RequestLabels { outcome, model: model.to_string() });
        self.clients.request(client, outcome);
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.totals.requests[i].fetch_add(1, Ordering::Relaxed);
        }
        self.queue_wait.observe(waited.as_secs_f64());
        if absorbed_429 > 0 && outcome == "success" {
            self.absorbed_429.inc_by(u64::from(absorbed_429));
            self.totals.absorbed_429.fetch_add(u64::from(absorbed_429), Ordering::Relaxed);
        }
        self.recent().request(waited);
    }

    /// An upstream attempt on `account` ended: `status` is the response status, or "connect_error",
    /// "reset", "timeout".
    pub fn attempt(&self, status: &str, account: &str, ttfb: Option<Duration>) {
        self.attempts.inc_by([status, account, ""], 1, || StatusLabels {
            status: status.to_string(),
            account: account.to_string(),
        });
        self.totals.attempts.fetch_add(1, Ordering::Relaxed);
        let throttled = status == "429";
        if throttled {
            self.totals.throttled.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ttfb) = ttfb {
            self.ttfb.observe(ttfb.as_secs_f64());
        }
        self.recent().attempt(throttled);
    }

    /// Creates the retry series at zero, so every reason is scraped from the start.
    pub fn declare_retry_reasons(&self, reasons: impl IntoIterator<Item = &'static str>) {
        for reason in reasons {
            drop(self.retries.get_or_create(&ReasonLabels { reason }));
        }
    }

    /// A request moved from upstream `from` to `to` (target names: bounded).
    pub fn fallback(&self, from: &str, to: &str, reason: &'static str) {
        self.fallbacks.get_or_create(&FallbackLabels { from: from.to_string(), to: to.to_string(), reason }).inc();
    }

    /// A broken stream was continued (`resumed`) or could not be (`refused`).
    pub fn resume(&self, reason: &'static str) {
        self.resumes.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A request panicked and was rescued into a 500.
    pub fn panicked(&self) {
        self.panics.inc();
    }

    pub fn retry(&self, reason: &'static str) {
        self.retries.get_or_create(&ReasonLabels { reason }).inc();
        self.totals.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A response body ended (or was dropped): total duration, tokens (of `account`, for `client`), and
    /// whether the upstream broke.
    pub fn response_finished(
        &self,
        duration: Duration,
        model: &str,
        (account, client): (&str, &str),
        usage: Option<Usage>,
        broken: bool,
    ) {
        self.duration.observe(duration.as_secs_f64());
        if broken {
            self.stream_errors.inc();
        }
        if let Some(usage) = usage {
            self.tokens_used(model, account, client, &usage);
        }
    }

    /// Tokens a response used (of `model` on `account`, for `client`).
    pub fn tokens_used(&self, model: &str, account: &str, client: &str, usage: &Usage) {
        self.clients.tokens(client, usage);
        self.totals.prompt_tokens.fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        self.totals.completion_tokens.fetch_add(usage.completion_tokens, Ordering::Relaxed);
        self.recent().tokens(usage.prompt_tokens + usage.completion_tokens);
        for (kind, count) in usage.kinds() {
            if count > 0 {
                self.tokens.inc_by([model, kind, account], count, || TokenLabels {
                    model: model.to_string(),
                    kind,
                    account: account.to_string(),
                });
            }
        }
    }
}

/// prometheus-client writes OpenMetrics, where a counter family is named without `_total` and the text
/// ends with `# EOF`. The Prometheus text format (what `promtool check metrics` and every Prometheus
/// scraper read) names the family with `_total` and has no `# EOF`; the samples are the same.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(text.len() + 16 * counters.len());
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        let header = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match header {
            Some((prefix, rest)) if counters.iter().any(|c| rest.split(' ').next() == Some(c)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_take_their_total_name() {
        let open = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\n\
                    # HELP x_depth Depth.\n# TYPE x_depth gauge\nx_depth 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(open),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n\
             # HELP x_depth Depth.\n# TYPE x_depth gauge\nx_depth 1\n"
        );
    }

    #[test]
    fn model_labels_are_bounded() {
        let limits = LimitsConfig::default();
        assert_eq!(model_label(Some("deepseek-v4-pro"), &limits), "deepseek-v4-pro");
        assert_eq!(model_label(Some("deepseek-chat"), &limits), "deepseek-v4-flash", "aliases resolve");
        assert_eq!(model_label(Some("anything-else"), &limits), "other");
        assert_eq!(model_label(None, &limits), "unknown");
    }
}
