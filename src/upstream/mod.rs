//! How sluice reaches the upstream: over h2 the connections of `h2pool/` (tried first for `https://`),
//! over HTTP/1.1 hyper-util's pooled client — both over rustls (ring provider, the roots of `tls.rs`,
//! the protocol chosen by ALPN), directly or through a proxy (`egress.rs`); the rule that builds every target URL from
//! `upstream.base_url`, and the header timeout; the accounts and their keys' health (`accounts.rs`) and
//! their balance (`balance.rs`). Send errors are typed so the retry loop knows what may have reached the
//! upstream.

pub mod accounts;
pub mod balance;
mod egress;
mod h2pool;
mod tls;

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use egress::{Bounded, Egress};
pub use h2pool::UpstreamBody;
use h2pool::{H2Pool, Sent};

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, DNS, TLS handshake, connect timeout): nothing was sent.
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// The connection failed after the request was (perhaps partly) sent, before any response byte.
    #[error("the upstream connection failed before a response: {0}")]
    Reset(String),
    /// No response headers within `upstream.header_timeout`; the upstream may still be working on it.
    #[error("no response headers within {}", humantime::format_duration(*.0))]
    HeaderTimeout(Duration),
    /// The response's body broke or stalled before it was complete, and nothing of it reached the client.
    #[error("the upstream response was cut before it was complete")]
    BodyCut,
}

impl SendError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect_error",
            Self::Reset(_) => "reset",
            Self::HeaderTimeout(_) => "timeout",
            Self::BodyCut => "body_cut",
        }
    }
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("upstream.base_url {0:?} is not a usable URL")]
    BaseUrl(String),
    #[error("{0}")]
    Roots(String),
}

/// The upstream: where requests go and the client that takes them there.
#[derive(Clone)]
pub struct Upstream {
    /// One pooled client per runtime (`shard`): a request uses connections its own thread drives.
    clients: Arc<[PooledClient]>,
    /// Per runtime as well: the h2 connections used once the upstream has answered over h2.
    h2: Arc<[H2Pool]>,
    /// Requests go through `h2`: from the start for `https://` (until a connection's ALPN says
    /// HTTP/1.1), and once a response came over h2 through hyper-util's pool.
    speaks_h2: Arc<AtomicBool>,
    /// `scheme://authority` of `base_url`.
    origin: Arc<str>,
    /// `base_url`'s path without a trailing slash ("" for the default), prefixed to every request path.
    base_path: Arc<str>,
    /// `origin`'s parts, parsed once: every target is built on them.
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    header_timeout: Duration,
    /// Connection failures, for a warning that is said at once and then at most once a minute.
    unreachable: Arc<Mutex<UnreachableLog>>,
}

type Connector = Bounded<HttpsConnector<Egress>>;
type PooledClient = Client<Connector, Full<Bytes>>;

/// The current run of connection failures: since when, when it was last told, and how many since.
#[derive(Debug, Default)]
struct UnreachableLog {
    since: Option<tokio::time::Instant>,
    last_warned: Option<tokio::time::Instant>,
    since_warned: u64,
}

/// At most one unreachable warning this often.
const UNREACHABLE_WARN_EVERY: Duration = Duration::from_secs(60);

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, BuildError> {
        let base: Uri = config.base_url.parse().map_err(|_| BuildError::BaseUrl(config.base_url.clone()))?;
        let (Some(scheme), Some(authority)) = (base.scheme().cloned(), base.authority().cloned()) else {
            return Err(BuildError::BaseUrl(config.base_url.clone()));
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let egress = Egress::new(http, config.proxy.as_ref());
        if let Some(proxy) = egress.proxy_for(&base) {
            tracing::info!(%proxy, upstream = %config.base_url, "upstream connections go through a proxy");
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(config)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(egress.clone());
        let connector = Bounded::new(https, egress, config.connect_timeout);
        let mut pool = Client::builder(TokioExecutor::new());
        pool.pool_idle_timeout(config.pool_idle_timeout).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
        let clients = (0..crate::shard::count()).map(|_| pool.build(connector.clone())).collect();
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| BuildError::BaseUrl(config.base_url.clone()))?;
        let h2 = (0..crate::shard::count())
            .map(|_| H2Pool::new(connector.clone(), origin.clone(), config.connect_timeout, config.pool_idle_timeout))
            .collect();
        Ok(Self {
            clients,
            h2,
            speaks_h2: Arc::new(AtomicBool::new(scheme == http::uri::Scheme::HTTPS)),
            origin: Arc::from(format!("{scheme}://{authority}")),
            base_path: Arc::from(base.path().trim_end_matches('/')),
            scheme,
            authority,
            header_timeout: config.header_timeout,
            unreachable: Arc::default(),
        })
    }

    /// HTTP/2 requests given back unsent or refused unprocessed by the upstream, and sent again.
    pub fn h2_sent_again(&self) -> u64 {
        self.h2.iter().map(H2Pool::sent_again).sum()
    }

    /// An attempt got response headers: the upstream is reachable.
    pub fn reached(&self) {
        let mut log = self.unreachable.lock().unwrap_or_else(PoisonError::into_inner);
        if log.since.take().is_some() {
            tracing::info!(upstream = %self.origin, "the upstream is reachable again");
        }
    }

    /// Since when no attempt could connect (None: the last one did).
    pub fn unreachable_since(&self) -> Option<tokio::time::Instant> {
        self.unreachable.lock().unwrap_or_else(PoisonError::into_inner).since
    }

    /// A warning when the key would travel in clear text: `http://` to a host that is not loopback.
    pub fn cleartext_warning(&self, has_key: bool) -> Option<String> {
        let host = self.authority.host().trim_matches(['[', ']']);
        (self.scheme.as_str() == "http" && !egress::is_loopback(host) && has_key).then(|| {
            format!("upstream.base_url is plain http:// to {host}: the API key travels unencrypted; use https://")
        })
    }

    /// An attempt could not connect: warn at once, then at most once a minute while it lasts, with the count.
    pub fn unreachable(&self, err: &SendError) {
        let now = tokio::time::Instant::now();
        let mut log = self.unreachable.lock().unwrap_or_else(PoisonError::into_inner);
        log.since.get_or_insert(now);
        log.since_warned += 1;
        if log.last_warned.is_some_and(|at| now.saturating_duration_since(at) < UNREACHABLE_WARN_EVERY) {
            return;
        }
        let failures = std::mem::take(&mut log.since_warned);
        log.last_warned = Some(now);
        drop(log);
        tracing::warn!(upstream = %self.origin, failures, error = %err, "cannot reach the upstream");
    }

    /// The upstream URL for a request's path and query: always the configured origin, never anything
    /// the client named, so sluice cannot be used as an open proxy.
    pub fn target(&self, path_and_query: &str) -> Option<Uri> {
        if !path_and_query.starts_with('/') {
            return None;
        }
        // The path is only ever a path: scheme and authority are the configured ones, whatever it holds.
        let path_and_query: http::uri::PathAndQuery = if self.base_path.is_empty() {
            path_and_query.parse().ok()?
        } else {
            format!("{}{path_and_query}", self.base_path).parse().ok()?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .ok()
    }

    /// Sends one request and waits for the response headers, at most `header_timeout`.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<UpstreamBody>, SendError> {
        match tokio::time::timeout(self.header_timeout, self.send_now(request)).await {
            Err(_) => Err(SendError::HeaderTimeout(self.header_timeout)),
            Ok(sent) => sent,
        }
    }

    /// Sends over this runtime's h2 connections while the upstream speaks h2, else through
    /// hyper-util's pool.
    async fn send_now(&self, request: Request<Full<Bytes>>) -> Result<Response<UpstreamBody>, SendError> {
        // Never empty (`shard::count` is at least one); the index is below its length.
        let shard = crate::shard::index(self.clients.len());
        let request = match self.speaks_h2.load(Ordering::Relaxed) {
            true => match self.h2[shard].send(request).await? {
                Sent::Response(response) => return Ok(response),
                Sent::NotOffered(request) => {
                    self.speaks_h2.store(false, Ordering::Relaxed);
                    request
                }
            },
            false => request,
        };
        match self.clients[shard].request(request).await {
            Ok(response) => {
                if response.version() == http::Version::HTTP_2 {
                    self.speaks_h2.store(true, Ordering::Relaxed);
                }
                Ok(response.map(UpstreamBody::unpooled))
            }
            Err(err) if err.is_connect() => Err(SendError::Connect(error_chain(&err))),
            Err(err) => Err(SendError::Reset(error_chain(&err))),
        }
    }
}

/// An error and its sources on one line ("client error (Connect): tcp connect error: Connection refused").
pub fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base_url: &str) -> Upstream {
        let config = UpstreamConfig { base_url: base_url.into(), ..UpstreamConfig::default() };
        Upstream::new(&config).unwrap()
    }

    #[tokio::test]
    async fn targets_stay_on_the_configured_origin() {
        let up = upstream("https://api.deepseek.com");
        assert_eq!(up.target("/v1/chat/completions?x=1").unwrap(), "https://api.deepseek.com/v1/chat/completions?x=1");
        assert_eq!(up.target("//evil.example/x").unwrap().host(), Some("api.deepseek.com"));
        assert!(up.target("*").is_none());
        assert!(up.target("@evil.example/x").is_none());
        assert!(up.target("http://evil.example/x").is_none());
    }

    #[tokio::test]
    async fn a_key_over_plain_http_to_another_host_is_warned_about() {
        assert!(upstream("http://10.0.0.5:8080").cleartext_warning(true).is_some());
        assert!(upstream("http://api.example.com").cleartext_warning(true).is_some());
        assert!(upstream("http://api.example.com").cleartext_warning(false).is_none());
        for quiet in ["http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9", "https://api.deepseek.com"] {
            assert!(upstream(quiet).cleartext_warning(true).is_none(), "{quiet}");
        }
    }

    #[tokio::test]
    async fn base_path_is_prefixed() {
        let up = upstream("http://127.0.0.1:9/prefix/");
        assert_eq!(up.target("/models").unwrap(), "http://127.0.0.1:9/prefix/models");
    }
}
