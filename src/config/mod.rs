//! The daemon's configuration: typed sections with their defaults (the embedded defaults),
//! validation with errors that name the key, and — in `load` — the layering of file, env and flags.

mod cache;
mod clients;
mod cluster;
mod explain;
mod fallback;
mod load;
mod rate;
mod secret;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cache::{ByteSize, CacheBackend, CacheConfig};
pub use clients::{token_sha256, validate as validate_clients, ClientConfig, PriorityName, ANONYMOUS};
pub use cluster::ClusterConfig;
pub use fallback::{FallbackConfig, FallbackSettings};
pub use load::{load, load_api_key, Overrides};
pub use rate::Rate;
pub use secret::{ApiKey, Secret};
pub use upstream::{without_credentials, AccountConfig, BalanceConfig, ProxyUrl, TlsRoots, UpstreamConfig};

/// Everything sluice can be told. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    pub cache: CacheConfig,
    pub observe: ObserveConfig,
    /// The local callers sluice knows by token (`[[clients]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// When fallbacks take over, and stream resume.
    pub fallback: FallbackSettings,
    /// Several instances sharing limits through Redis.
    pub cluster: ClusterConfig,
    /// Where requests go when the primary cannot answer, in order (`[[fallbacks]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<FallbackConfig>,
    /// What loading changed or noticed, for the operator (logged at warn at start, shown by check-config).
    #[serde(skip)]
    pub notes: Vec<String>,
}

/// `[server]`: the listener that applications talk to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default: sluice holds an API key, so it is not for the world.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413 `sluice_body_too_large`.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers) for HTTP/1, and header list for HTTP/2.
    /// For HTTP/1 it also caps each connection's read buffer, which dominates what a waiting request
    /// costs: keep it small.
    pub max_header_bytes: usize,
    /// A client must send its complete request head within this time (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send its complete request body within this time.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Client connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Request bodies held in memory at once, all requests together (they wait in the queue with their
    /// request); beyond it new requests get 503 `sluice_queue_full`. At least `max_body_bytes`.
    pub max_buffered_bytes: usize,
    /// A client connection with no request in progress and no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Every proxied request needs the token of a configured `[[clients]]` entry (else 401).
    pub require_client_token: bool,
    /// Where sluice keeps what must survive a restart (the clients' token counts of the day). Unset:
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`), else nowhere (counts start over at each start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            max_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 8 * 1024,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 16_384,
            max_buffered_bytes: 512 * 1024 * 1024,
            idle_timeout: Duration::from_secs(120),
            require_client_token: false,
            state_dir: None,
        }
    }
}

/// `[log]`: how sluice writes its log to stderr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`), optionally with per-target levels: `info,hyper=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

/// The two log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[limits]`: what sluice lets through to the upstream at once and per unit of time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Global request rate (GCRA), e.g. "600/min". Unset: no rate limit.
    pub rate: Option<Rate>,
    /// How many requests may go at once above the steady rate. Unset: one second's worth (at least 1).
    pub burst: Option<u32>,
    /// Requests in flight upstream at once, all models together.
    pub max_concurrency: u32,
    /// Learn each model's real concurrency limit (AIMD) between `min_concurrency` and its configured cap.
    pub adaptive: bool,
    /// The floor of a learned limit.
    pub min_concurrency: u32,
    /// Per-model caps on requests in flight (a stream holds its slot until it ends).
    pub models: BTreeMap<String, ModelLimits>,
    /// Model names that share another model's slots (DeepSeek's deprecated names count as v4-flash).
    pub aliases: BTreeMap<String, String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let model = |cap| ModelLimits { max_concurrency: cap };
        Self {
            rate: None,
            burst: None,
            max_concurrency: 4096,
            adaptive: true,
            min_concurrency: 1,
            models: BTreeMap::from([
                ("deepseek-v4-pro".to_string(), model(500)),
                ("deepseek-v4-flash".to_string(), model(2500)),
            ]),
            aliases: BTreeMap::from([
                ("deepseek-chat".to_string(), "deepseek-v4-flash".to_string()),
                ("deepseek-reasoner".to_string(), "deepseek-v4-flash".to_string()),
            ]),
        }
    }
}

impl LimitsConfig {
    /// The GCRA burst in force: the configured one, else one second's worth of the rate (at least 1).
    pub fn effective_burst(&self) -> Option<u32> {
        let rate = self.rate?;
        Some(self.burst.unwrap_or_else(|| (rate.per_second().floor() as u32).max(1)))
    }
}

/// `[limits.models."NAME"]`: one model's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Requests for this model in flight upstream at once.
    pub max_concurrency: u32,
}

/// `[queue]`: where requests wait for a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Requests waiting at once; one more gets 503 `sluice_queue_full` at once.
    pub max_depth: usize,
    /// How long a request may wait and retry in all before it gets 503 `sluice_deadline_exceeded`.
    /// Keep it under the clients' own timeout (600 s for the OpenAI SDKs).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// A streaming request with no response after this long gets its head (200, SSE) and then an SSE
    /// comment every interval while it waits; later failures are in-band error events. 0s: off.
    #[serde(with = "humantime_serde")]
    pub stream_keepalive: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_depth: 10_000, max_wait: Duration::from_secs(300), stream_keepalive: Duration::from_secs(15) }
    }
}

/// `[retry]`: which upstream answers are retried, and how far apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Upstream statuses that are retried (connection failures before any response are retried too).
    pub on_status: Vec<u16>,
    /// First backoff step; attempt n waits a random time in [0, min(max_delay, base_delay·2^n)].
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Longest wait between two attempts, also the cap on an upstream's Retry-After.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            on_status: vec![429, 500, 502, 503, 504],
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// `[observe]`: the operator endpoints on the listener (never forwarded upstream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObserveConfig {
    /// Serve `GET /metrics` (Prometheus).
    pub metrics: bool,
    /// Serve `GET /status` (JSON snapshot).
    pub status: bool,
    /// Serve `GET /dashboard` (live HTML page).
    pub dashboard: bool,
    /// When set, /metrics, /status and /dashboard need `Authorization: Bearer <token>` (or `?token=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<Secret>,
    /// A file holding the admin token (instead of `admin_token`).
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        Self { metrics: true, status: true, dashboard: true, admin_token: None, admin_token_file: None }
    }
}

/// A configuration that cannot be used, naming the key, the value and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value for `{key}`: {value} ({expected})")]
    Invalid { key: String, value: String, expected: String },
    #[error("{0}")]
    Load(#[from] ::config::ConfigError),
    #[error("cannot read {what} from {path}: {source}")]
    Io { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    /// Any of the above, with where the value came from (`explain.rs`).
    #[error("{message} (from {origin})")]
    Located { message: String, origin: String },
}

/// The longest duration any key accepts (longer ones are mistakes, and overflow time arithmetic).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn invalid(key: impl Into<String>, value: impl std::fmt::Display, expected: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: value.to_string(), expected: expected.into() }
}

impl Config {
    /// Checks what the types alone cannot: ranges, URLs, and references between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url: http::Uri = self
            .upstream
            .base_url
            .parse()
            .map_err(|_| invalid("upstream.base_url", &self.upstream.base_url, "an http:// or https:// URL"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(invalid(
                "upstream.base_url",
                &self.upstream.base_url,
                "an http:// or https:// URL with a host",
            ));
        }
        if url.query().is_some() {
            return Err(invalid("upstream.base_url", &self.upstream.base_url, "a URL without a query string"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", 0, "at least 1"));
        }
        if !(8192..=16 * 1024 * 1024).contains(&self.server.max_header_bytes) {
            return Err(invalid("server.max_header_bytes", self.server.max_header_bytes, "8192 to 16777216"));
        }
        let durations = [
            ("server.header_read_timeout", self.server.header_read_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.header_timeout", self.upstream.header_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("upstream.unreachable_wait", self.upstream.unreachable_wait),
            ("queue.max_wait", self.queue.max_wait),
            ("retry.base_delay", self.retry.base_delay),
            ("retry.max_delay", self.retry.max_delay),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return Err(invalid(key, "0s", "a duration longer than zero, such as \"500ms\" or \"10m\""));
            }
        }
        let bounded = durations.into_iter().chain([
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("queue.stream_keepalive", self.queue.stream_keepalive),
            ("upstream.pool_idle_timeout", self.upstream.pool_idle_timeout),
        ]);
        for (key, value) in bounded {
            if value > MAX_DURATION {
                return Err(invalid(
                    key,
                    humantime::format_duration(value),
                    "at most 7 days, such as \"10m\" or \"24h\"",
                ));
            }
        }
        self.upstream.validate_accounts()?;
        clients::validate(&self.clients)?;
        let account_names: Vec<String> = self.upstream.accounts.iter().map(|a| a.name.clone()).collect();
        fallback::validate(&self.fallbacks, &account_names, &self.upstream.base_url)?;
        let keepalive = self.queue.stream_keepalive;
        if !keepalive.is_zero() && keepalive < Duration::from_secs(1) {
            return Err(invalid(
                "queue.stream_keepalive",
                humantime::format_duration(keepalive),
                "\"0s\" (off) or at least \"1s\", such as \"15s\"",
            ));
        }
        if let Some(proxy) = &self.upstream.proxy {
            proxy.validate()?;
        }
        if self.fallback.after.is_zero() || self.fallback.after > MAX_DURATION {
            return Err(invalid(
                "fallback.after",
                humantime::format_duration(self.fallback.after),
                "from 1s to 7 days",
            ));
        }
        if self.fallback.first_token_timeout.is_zero() || self.fallback.first_token_timeout > MAX_DURATION {
            return Err(invalid(
                "fallback.first_token_timeout",
                humantime::format_duration(self.fallback.first_token_timeout),
                "from 1s to 7 days",
            ));
        }
        if self.server.require_client_token && self.clients.is_empty() {
            return Err(invalid(
                "server.require_client_token",
                true,
                "false, or at least one [[clients]] entry (`sluice client new NAME` makes one)",
            ));
        }
        if self.cache.enabled && self.cache.backend == CacheBackend::Redis && self.cache.redis_url.is_none() {
            return Err(invalid(
                "cache.redis_url",
                "unset",
                "a Redis URL such as \"redis://127.0.0.1:6379/0\" for backend = \"redis\"",
            ));
        }
        if let Some(url) = self.cache.redis_url.as_deref() {
            cache::check_redis_url("cache.redis_url", url)?;
        }
        self.cluster.validate()?;
        if self.cache.ttl.is_zero() || self.cache.ttl > MAX_DURATION {
            return Err(invalid(
                "cache.ttl",
                humantime::format_duration(self.cache.ttl),
                "from 1s to 7 days, such as \"1h\"",
            ));
        }
        if self.upstream.balance.poll > MAX_DURATION {
            return Err(invalid(
                "upstream.balance.poll",
                humantime::format_duration(self.upstream.balance.poll),
                "at most 7 days, such as \"10m\" (or \"0s\": off)",
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", 0, "at least 1"));
        }
        if self.server.max_buffered_bytes < self.server.max_body_bytes {
            return Err(invalid(
                "server.max_buffered_bytes",
                self.server.max_buffered_bytes,
                "at least server.max_body_bytes",
            ));
        }
        if let Some(path) = self.upstream.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(invalid(
                "upstream.paths",
                format!("{path:?}"),
                "path prefixes starting with \"/\", such as \"/v1/\"",
            ));
        }
        if self.retry.base_delay > self.retry.max_delay {
            return Err(invalid(
                "retry.base_delay",
                humantime::format_duration(self.retry.base_delay),
                "at most retry.max_delay",
            ));
        }
        for status in &self.retry.on_status {
            if !(400..=599).contains(status) || matches!(status, 400 | 401 | 402 | 422) {
                return Err(invalid("retry.on_status", status, "4xx/5xx statuses other than 400, 401, 402, 422"));
            }
        }
        if self.limits.max_concurrency == 0 {
            return Err(invalid("limits.max_concurrency", 0, "at least 1"));
        }
        if self.limits.min_concurrency == 0 || self.limits.min_concurrency > self.limits.max_concurrency {
            return Err(invalid("limits.min_concurrency", self.limits.min_concurrency, "1 to limits.max_concurrency"));
        }
        if self.limits.burst == Some(0) {
            return Err(invalid("limits.burst", 0, "at least 1"));
        }
        for (name, model) in &self.limits.models {
            if model.max_concurrency == 0 {
                return Err(invalid(format!("limits.models.\"{name}\".max_concurrency"), 0, "at least 1"));
            }
        }
        for (alias, target) in &self.limits.aliases {
            if !self.limits.models.contains_key(target) {
                return Err(invalid(
                    format!("limits.aliases.\"{alias}\""),
                    format!("{target:?}"),
                    "the name of a model under [limits.models]",
                ));
            }
        }
        if self.observe.admin_token.is_some() && self.observe.admin_token_file.is_some() {
            return Err(invalid(
                "observe.admin_token_file",
                self.observe.admin_token_file.as_ref().map_or(String::new(), |p| p.display().to_string()),
                "unset while observe.admin_token is set: use one of the two",
            ));
        }
        if self.observe.admin_token.as_ref().is_some_and(Secret::is_empty) {
            return Err(invalid("observe.admin_token", "\"\"", "a non-empty token, or no admin_token at all"));
        }
        if self.queue.max_depth == 0 {
            return Err(invalid("queue.max_depth", 0, "at least 1"));
        }
        self.log.level.parse::<tracing_subscriber::filter::Targets>().map_err(|_| {
            invalid("log.level", format!("{:?}", self.log.level), "a level such as \"info\" or \"info,hyper=warn\"")
        })?;
        Ok(())
    }

    /// The effective config as TOML, with every secret redacted (for `sluice check-config`).
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut shown = self.clone();
        shown.cache.redis_url = shown.cache.redis_url.as_deref().map(cache::without_password);
        shown.cluster.redis_url = shown.cluster.redis_url.as_deref().map(cache::without_password);
        toml::to_string_pretty(&shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validation_names_key_value_and_range() {
        let mut config = Config::default();
        config.retry.on_status = vec![429, 401];
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("retry.on_status") && message.contains("401"), "{message}");

        let mut config = Config::default();
        config.upstream.base_url = "ftp://example.com".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("upstream.base_url") && message.contains("ftp://example.com"), "{message}");

        let mut config = Config::default();
        config.limits.aliases.insert("x".into(), "nope".into());
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("limits.aliases") && message.contains("nope"), "{message}");

        let mut config = Config::default();
        config.queue.max_wait = Duration::from_secs(1_000_000 * 365 * 24 * 3600);
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("queue.max_wait") && message.contains("7 days"), "{message}");

        let mut config = Config::default();
        config.server.max_buffered_bytes = 10;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("server.max_buffered_bytes"), "{message}");
    }

    #[test]
    fn burst_defaults_to_one_second_of_rate() {
        let mut limits = LimitsConfig::default();
        assert_eq!(limits.effective_burst(), None);
        limits.rate = Some("600/min".parse().unwrap());
        assert_eq!(limits.effective_burst(), Some(10));
        limits.rate = Some("6/min".parse().unwrap());
        assert_eq!(limits.effective_burst(), Some(1));
        limits.burst = Some(3);
        assert_eq!(limits.effective_burst(), Some(3));
    }
}
