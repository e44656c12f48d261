//! The request path, top to bottom: refuse what is never forwarded → who calls (`clients.rs`, the day's
//! tokens in `ledger.rs`) → check the queue has room → read the bounded body → see which model, how
//! urgently → the cache (`cached.rs`: a hit, or a call shared by identical requests) → build the upstream
//! request → admission, upstream, retries and fallbacks (`attempts.rs`, `policy.rs`, `fallback.rs`,
//! `circuit.rs`), the start of the response read first (`deliver.rs`) → the client's response
//! (`respond.rs`: streamed back as it arrives, resumed when a stream breaks, redone when a committed JSON
//! body is cut). Errors become responses in one place (`ProxyError::into_response`); a request whose
//! client leaves before its answer is counted as `cancelled` (`track.rs`).

mod attempts;
mod balance;
mod body;
mod cached;
mod circuit;
mod clients;
mod cluster_facts;
mod committed;
mod deliver;
mod events;
mod fallback;
mod headers;
mod ledger;
mod policy;
mod queued;
mod request;
mod respond;
mod resume;
mod retry;
mod sse;
mod stop;
mod track;

use std::hash::RandomState;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use tokio::time::Instant;

pub use body::{BoxError, Relay, ResponseBody};
pub use request::{BodyBudget, CLIENT_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER};
pub use stop::Stop;

use crate::admission::Admission;
use crate::cache::{Coalescer, Store, CACHE_HEADER};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::ProxyError;
use crate::observe::{self, CacheMetrics, Charge, Metrics, RequestLog};
use crate::upstream::accounts::Accounts;
use crate::upstream::{BuildError, Upstream};
use attempts::Progress;
use cached::{Outcome, Step, Work};
use clients::Clients;
use ledger::Ledger;
use request::{Inspection, Outgoing};
use track::Track;

/// Response header: upstream attempts this request took.
pub const ATTEMPTS_HEADER: &str = "x-sluice-attempts";
/// Response header: milliseconds the request spent waiting (queue and backoff).
pub const QUEUE_MS_HEADER: &str = "x-sluice-queue-ms";
/// Response header: the upstream that answered (`primary`, a fallback's name, or `cache`).
pub const UPSTREAM_HEADER: &str = "x-sluice-upstream";

/// Everything a request needs on its way: the config and upstream client in force, and admission.
pub struct Proxy {
    /// Swapped whole by a reload; each request takes the one in force when it arrives and keeps it.
    current: Arc<RwLock<Arc<Generation>>>,
    admission: Admission,
    metrics: Arc<Metrics>,
    /// Keys the client-identity hash; random per process, so hashes mean nothing elsewhere.
    hasher: RandomState,
    /// Request bodies held in memory, all requests together.
    budget: Arc<BodyBudget>,
    /// The end of a shutdown drain: everything still on its way answers now.
    stop: Arc<Stop>,
    /// Asks the balance watch to read every account's balance now (after a reload).
    read_balances: Arc<tokio::sync::Notify>,
    /// The calls in flight that identical requests join (`cache.coalesce`).
    calls: Coalescer<Outcome>,
    /// The configured clients' tokens of the day (kept across reloads and, in `server.state_dir`, restarts).
    ledger: Arc<Ledger>,
    /// The primary's circuit, when fallbacks are configured (kept across reloads).
    circuit: std::sync::Mutex<circuit::Circuit>,
    /// The cluster this instance shares its lanes' limits with (`[cluster]`; a restart changes it).
    cluster: Option<Arc<Cluster>>,
}

/// One generation of the config, the upstream client and the accounts built from it.
pub struct Generation {
    pub config: Config,
    upstream: Upstream,
    /// The accounts and their keys' health (fresh with each reload).
    pub accounts: Arc<Accounts>,
    /// The response cache's store, when `cache.enabled` (kept by a reload that does not change it).
    pub cache: Option<Arc<Store>>,
    /// The configured clients.
    pub clients: Clients,
    /// Where requests may go: the primary, then the fallbacks in order.
    targets: Vec<fallback::Target>,
}

impl Generation {
    /// The primary upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn new(
        config: Config,
        upstream: Upstream,
        cache: Option<Arc<Store>>,
        hasher: &RandomState,
    ) -> Result<Self, BuildError> {
        let accounts = Arc::new(Accounts::new(&config.upstream).with_fallbacks(&config.fallbacks));
        let clients = Clients::new(&config, hasher);
        let targets = fallback::targets(&config, &upstream, &accounts)?;
        Ok(Self { config, upstream, accounts, cache, clients, targets })
    }
}

/// Config keys a reload cannot apply to a running process (they shape the listener, the logger, where
/// state is kept, or the cluster joined).
const RESTART_KEYS: [&str; 7] = [
    "server.listen",
    "server.max_header_bytes",
    "server.header_read_timeout",
    "log.format",
    "log.level",
    "server.state_dir",
    "cluster",
];

impl Proxy {
    /// Builds the proxy and starts admission's dispatcher (needs a tokio runtime).
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let upstream = Upstream::new(&config.upstream)?;
        warn_cleartext(&upstream, &config);
        let budget = BodyBudget::new(config.server.max_buffered_bytes);
        let cache_metrics = Arc::new(CacheMetrics::default());
        let cache = Store::new(&config.cache, &cache_metrics);
        let hasher = RandomState::new();
        let ledger = Arc::new(Ledger::open(config.server.state_dir.as_deref()));
        warn_clients_without_key(&config);
        for note in &config.notes {
            tracing::warn!("{note}");
        }
        let generation = Generation::new(config, upstream, cache, &hasher)?;
        let config = &generation.config;
        let admission = Admission::new(&config.limits, &config.queue, &config.retry, generation.accounts.limits());
        admission.set_clients(generation.clients.limits());
        let generation = Arc::new(generation);
        let current = Arc::new(RwLock::new(generation.clone()));
        let facts = cluster_facts::InstanceFacts {
            current: Arc::downgrade(&current),
            ledger: Arc::downgrade(&ledger),
            admission: admission.clone(),
        };
        let cluster = Cluster::start(&generation.config, admission.clone(), Arc::new(facts));
        let sources = observe::Sources { accounts: balance::accounts_source(&current), cluster: cluster.clone() };
        let metrics = Arc::new(Metrics::new(admission.clone(), sources, cache_metrics));
        metrics.declare_retry_reasons(retry::RetryReason::ALL.map(retry::RetryReason::as_str));
        let stop = Arc::new(Stop::default());
        let read_balances = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(balance::watch(Arc::downgrade(&current), admission.clone(), read_balances.clone()));
        tokio::spawn(ledger::keep_saved(Arc::downgrade(&ledger)));
        let calls = Coalescer::default();
        let circuit = std::sync::Mutex::default();
        Ok(Self { current, admission, metrics, hasher, budget, stop, read_balances, calls, ledger, circuit, cluster })
    }

    /// Ends the drain: every request still on its way answers now (see `stop.rs`).
    pub fn stop_all(&self) {
        self.admission.close();
        self.stop.trigger();
    }

    /// The config and upstream client in force.
    pub fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts a new (validated) config in force: limits, queue, retry, upstream and key apply to every
    /// request from now on; queued and in-flight requests keep their place, their slots and their
    /// upstream connection. Returns the changed keys that only a restart applies.
    pub fn reload(&self, config: Config) -> Result<Vec<&'static str>, BuildError> {
        let old = self.current();
        let upstream = if config.upstream == old.config.upstream {
            old.upstream.clone()
        } else {
            let upstream = Upstream::new(&config.upstream)?;
            warn_cleartext(&upstream, &config);
            upstream
        };
        let (new_server, old_server) = (&config.server, &old.config.server);
        let changed = [
            new_server.listen != old_server.listen,
            new_server.max_header_bytes != old_server.max_header_bytes,
            new_server.header_read_timeout != old_server.header_read_timeout,
            config.log.format != old.config.log.format,
            config.log.level != old.config.log.level,
            new_server.state_dir != old_server.state_dir,
            config.cluster != old.config.cluster,
        ];
        let needs_restart = RESTART_KEYS.iter().zip(changed).filter(|(_, c)| *c).map(|(key, _)| *key).collect();
        let cache = if Store::serves(&old.config.cache, &config.cache) {
            old.cache.clone()
        } else {
            Store::new(&config.cache, &self.metrics.cache)
        };
        warn_clients_without_key(&config);
        for note in &config.notes {
            tracing::warn!("{note}");
        }
        let generation = Generation::new(config, upstream, cache, &self.hasher)?;
        let config = &generation.config;
        self.admission.set_clients(generation.clients.limits());
        self.admission.reconfigure(&config.limits, &config.queue, &config.retry, generation.accounts.limits());
        self.budget.set_limit(config.server.max_buffered_bytes);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(generation);
        self.read_balances.notify_one();
        Ok(needs_restart)
    }

    /// Writes what must survive a restart (the clients' tokens of the day); at shutdown.
    pub fn save_state(&self) {
        if let Err(err) = self.ledger.save() {
            tracing::warn!(error = %err, "cannot write the token ledger (server.state_dir)");
        }
    }

    /// Tokens `client` used today.
    pub fn tokens_today(&self, client: &str) -> u64 {
        self.ledger.used(client)
    }

    /// The cluster joined, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Whether the primary's circuit is open (requests start on a fallback).
    pub fn circuit_open(&self) -> bool {
        self.circuit().is_open()
    }

    /// The primary's circuit (a panic elsewhere while it was held leaves a state still worth using).
    fn circuit(&self) -> std::sync::MutexGuard<'_, circuit::Circuit> {
        self.circuit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one client request (any path but the reserved ones). The request comes boxed, and stays
    /// so until its head and body are taken apart: each frame of a waiting request holds a pointer, not
    /// a copy of its own.
    pub async fn handle<B>(self: &Arc<Self>, request: Box<Request<B>>, peer: SocketAddr) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let request_id = request::request_id(request.headers());
        let log = RequestLog::new(
            request_id.to_str().unwrap_or("-").to_owned(),
            request.method().clone(),
            request.uri().path(),
            Instant::now(),
        );
        // Should this future be dropped before it answers (the client went away while the request
        // waited), the track counts it as cancelled.
        let mut track =
            Track { request_id, log, progress: Progress::default(), metrics: Some(self.metrics.clone()), cache: None };
        let generation = self.current();
        let forwarded = self.forward(&generation, request, peer, &mut track).await;
        // Tokens and the log name the model that answered (a fallback's may not be the one asked for).
        if let Some(model) = track.progress.model.clone() {
            track.log.model_label = observe::model_label(Some(&model), &generation.config.limits);
        }
        // A head sent early: counted and logged in full when its request settles (`queued.rs`).
        let early = forwarded.as_ref().is_ok_and(|r| r.headers().contains_key(queued::QUEUED_HEADER));
        let mut response = match forwarded {
            Ok(response) if early => response,
            Ok(response) => {
                track.answered(track::outcome_of(response.status().as_u16()));
                response
            }
            Err(err) => {
                track.answered(err.outcome());
                track.log.error = Some(err.kind());
                tracing::debug!(request_id = %track.log.request_id, error = %err, "answering with sluice's own error");
                err.into_response()
            }
        };
        let cache = track.cache;
        let (request_id, mut log, progress) = track.into_parts();
        let headers = response.headers_mut();
        headers.insert(REQUEST_ID_HEADER, request_id);
        if !headers.contains_key(UPSTREAM_HEADER) {
            // Who answered: the upstream tried last, or sluice itself before any.
            let upstream = progress.upstream.as_deref().unwrap_or("sluice");
            headers
                .insert(UPSTREAM_HEADER, HeaderValue::from_str(upstream).unwrap_or(HeaderValue::from_static("sluice")));
        }
        if let Some(result) = cache {
            headers.insert(CACHE_HEADER, HeaderValue::from_static(result));
            log.cache = result;
        }
        // A head sent early knows neither yet (the log line has them when the request settles).
        if !early && (progress.attempts > 0 || !progress.waited.is_zero()) {
            headers.insert(ATTEMPTS_HEADER, HeaderValue::from(progress.attempts));
            headers.insert(QUEUE_MS_HEADER, HeaderValue::from(millis(progress.waited)));
        }
        log.status = response.status().as_u16();
        track::record(&mut log, &progress);
        // Usage is read from the body's plain bytes: not from an upstream's own error, nor a compressed one.
        let plain = !response.headers().contains_key(header::CONTENT_ENCODING);
        // A head sent early: its upstream body (and usage) comes later, if at all (`Relay::Settled`).
        log.report_to(self.metrics.clone(), progress.ttfb.is_some() && plain);
        response.body_mut().log_to(log);
        response
    }

    async fn forward<B>(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        request: Box<Request<B>>,
        peer: SocketAddr,
        track: &mut Track,
    ) -> Result<Response<ResponseBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let config = &generation.config;
        let server = &config.server;
        // 1. Refuse what sluice never forwards: CONNECT, absolute-form targets (open-proxy attempts), and
        //    paths that are not the API's.
        request::refuse_foreign(&request)?;
        let path = request.uri().path();
        if !request::forwarded_path(path, &config.upstream.paths) {
            return Err(ProxyError::NotForwarded(path.chars().take(200).collect()));
        }
        // 2. Who calls: a configured client by its token (required with server.require_client_token), within
        //    its day's tokens.
        let caller = generation.clients.identify(request.headers());
        match &caller {
            Some(known) => {
                track.log.client_name = known.name.clone();
                self.ledger.check(&known.name, known.daily_tokens)?;
                let (ledger, name) = (self.ledger.clone(), known.name.clone());
                track.log.charge_to(Charge(Box::new(move |tokens| ledger.charge(&name, tokens))));
            }
            None if generation.clients.required => return Err(ProxyError::ClientUnauthorized),
            None => {}
        }
        // 3. A full queue answers before the body is read (with the cache on: after it, below — a hit or a
        //    joined call needs no place in the queue).
        if generation.cache.is_none() {
            if let Some(depth) = self.admission.full() {
                return Err(ProxyError::QueueFull { depth, retry_after: 1 });
            }
        }
        // 4. Read the bounded body: retries re-send it and admission reads its model. It holds its share
        //    of the global body budget until the request ends.
        let (mut parts, body) = (*request).into_parts();
        // Boxed, like the upstream send: a queued request then carries no room for this state.
        let (body, budget) = Box::pin(tokio::time::timeout(
            server.body_read_timeout,
            request::read_body(body, &parts.headers, server.max_body_bytes, &self.budget),
        ))
        .await
        .map_err(|_| ProxyError::BadRequest("the request body did not arrive in time".into()))??;
        // 5. Who asks, for which model, how urgently.
        let seen = Inspection::new(&parts.headers, &body, peer, &self.hasher, caller.as_deref());
        track.log.request_bytes = body.len() as u64;
        if caller.is_some() {
            // A client's sluice token is sluice's business: it never travels upstream.
            parts.headers.remove(header::AUTHORIZATION);
        }
        track.log.model = seen.model.as_deref().map(Arc::from);
        track.log.model_label = observe::model_label(seen.model.as_deref(), &config.limits);
        track.log.stream = seen.stream;
        track.log.client = seen.client;
        // 6. The cache: a hit answers now; an identical request in flight is joined (`cached.rs`).
        let step = self.cache_step(generation, &parts, &body, track).await;
        let step = match step {
            Step::Hit(response) => return Ok(*response),
            Step::Follow(member) => return cached::member_response(member, false, track).await,
            step => step,
        };
        // A call that cannot start tells the members that joined it why.
        let refuse = |error: ProxyError| {
            if let Step::Lead(call, ..) = &step {
                call.abandon(Err(cached::Failed::new(error.clone())));
            }
            error
        };
        if generation.cache.is_some() {
            if let Some(depth) = self.admission.full() {
                return Err(refuse(ProxyError::QueueFull { depth, retry_after: 1 }));
            }
        }
        // 7. The upstream request, built once: header hygiene, key injection, the configured origin only.
        //    It takes the client's request head, so nothing of hyper's read buffer stays pinned.
        let outgoing = Outgoing::new(parts, body, &generation.upstream, &track.request_id).map_err(refuse)?;
        let deadline = track.log.started().checked_add(config.queue.max_wait).unwrap_or_else(Instant::now);
        if let Step::Lead(call, member, key, store) = step {
            // The call runs in its own task, for every member: this client may leave without ending it.
            let payer = (track.log.model_label.clone(), track.log.client_name.clone(), track.log.take_charge());
            let stream = seen.stream;
            let work = Work { outgoing, seen, deadline, hold: budget, payer, stream };
            self.start_call(call, generation.clone(), work, (key, store));
            return cached::member_response(member, true, track).await;
        }
        // 8. Admission, the upstream, retries — until a deliverable response or a final error. A stream
        //    that waits long gets its head early and keep-alive comments meanwhile (`queued.rs`).
        if seen.stream && !config.queue.stream_keepalive.is_zero() {
            return self.exchange_keeping_alive(generation, outgoing, seen, deadline, budget, track).await;
        }
        let sent = self.send_with_retries(generation, &outgoing, &seen, deadline, &mut track.progress, None).await?;
        // 9. Stream the response back frame by frame; the body holds the slot until it ends.
        self.respond(sent, generation, Some((outgoing, seen, deadline, Some(budget))))
    }
}

/// Milliseconds for a header or a log field, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Says so when clients are configured but sluice holds no key (their requests then reach the upstream
/// without one: a client token is never passed on).
fn warn_clients_without_key(config: &Config) {
    let keyed = config.upstream.api_key.is_some() || config.upstream.accounts.iter().any(|a| !a.keys.is_empty());
    if !config.clients.is_empty() && !keyed {
        tracing::warn!(
            "[[clients]] are configured but sluice holds no API key: their requests reach the upstream without one"
        );
    }
    let limited = config
        .clients
        .iter()
        .any(|c| c.max_concurrency.is_some() || c.rate.is_some() || c.max_queued.is_some() || c.daily_tokens.is_some());
    if limited && !config.server.require_client_token {
        tracing::warn!(
            "[[clients]] have quotas but server.require_client_token is false: a client that leaves out its token is served as anonymous, without them"
        );
    }
}

/// Says so at startup and reload when the key would travel in clear text.
fn warn_cleartext(upstream: &Upstream, config: &Config) {
    let keyed = config.upstream.api_key.is_some() || !config.upstream.accounts.is_empty();
    if let Some(warning) = upstream.cleartext_warning(keyed) {
        tracing::warn!("{warning}");
    }
}
