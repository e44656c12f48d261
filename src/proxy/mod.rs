//! The request path, top to bottom: refuse what is never forwarded → read the bounded body → see who
//! asks for which model → build the upstream request → admission, upstream, retries → stream the
//! response back frame by frame. Errors become responses in one place (`ProxyError::into_response`).

mod attempts;
mod body;
mod headers;
mod request;
mod retry;

use std::hash::RandomState;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use body::{BoxError, ResponseBody};
pub use request::{CLIENT_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER};

use crate::admission::{Admission, Permit};
use crate::config::Config;
use crate::error::ProxyError;
use crate::observe::{self, Metrics, RequestLog};
use crate::upstream::{BuildError, Upstream};
use attempts::Progress;
use request::{Inspection, Outgoing};

/// Response header: upstream attempts this request took.
pub const ATTEMPTS_HEADER: &str = "x-sluice-attempts";
/// Response header: milliseconds the request spent waiting (queue and backoff).
pub const QUEUE_MS_HEADER: &str = "x-sluice-queue-ms";

/// Everything a request needs on its way: the config and upstream client in force, and admission.
pub struct Proxy {
    /// Swapped whole by a reload; each request takes the one in force when it arrives and keeps it.
    current: RwLock<Arc<Generation>>,
    admission: Admission,
    metrics: Arc<Metrics>,
    /// Keys the client-identity hash; random per process, so hashes mean nothing elsewhere.
    hasher: RandomState,
}

/// One generation of the config and the upstream client built from it.
pub struct Generation {
    pub config: Config,
    upstream: Upstream,
}

/// Config keys a reload cannot apply to a running process (they shape the listener or the logger).
const RESTART_KEYS: [&str; 5] =
    ["server.listen", "server.max_header_bytes", "server.header_read_timeout", "log.format", "log.level"];

impl Proxy {
    /// Builds the proxy and starts admission's dispatcher (needs a tokio runtime).
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let upstream = Upstream::new(&config.upstream)?;
        let admission = Admission::new(&config.limits, &config.queue, &config.retry);
        let current = RwLock::new(Arc::new(Generation { config, upstream }));
        let metrics = Arc::new(Metrics::new(admission.clone()));
        metrics.declare_retry_reasons(retry::RetryReason::ALL.map(retry::RetryReason::as_str));
        Ok(Self { current, admission, metrics, hasher: RandomState::new() })
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
            Upstream::new(&config.upstream)?
        };
        let (new_server, old_server) = (&config.server, &old.config.server);
        let changed = [
            new_server.listen != old_server.listen,
            new_server.max_header_bytes != old_server.max_header_bytes,
            new_server.header_read_timeout != old_server.header_read_timeout,
            config.log.format != old.config.log.format,
            config.log.level != old.config.log.level,
        ];
        let needs_restart = RESTART_KEYS.iter().zip(changed).filter(|(_, c)| *c).map(|(key, _)| *key).collect();
        self.admission.reconfigure(&config.limits, &config.queue, &config.retry);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Generation { config, upstream });
        Ok(needs_restart)
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one client request (any path but the reserved ones).
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<ResponseBody>
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
        let mut track = Track { request_id, log, progress: Progress::default() };
        let generation = self.current();
        let mut response = match self.forward(&generation, request, peer, &mut track).await {
            Ok(response) => {
                let outcome = match response.status().as_u16() {
                    500.. => "upstream_error",
                    400.. => "client_error",
                    _ => "success",
                };
                self.answered(&track, outcome);
                response
            }
            Err(err) => {
                self.answered(&track, err.outcome());
                track.log.error = Some(err.kind());
                tracing::debug!(request_id = %track.log.request_id, error = %err, "answering with sluice's own error");
                err.into_response()
            }
        };
        let Track { request_id, mut log, progress } = track;
        let headers = response.headers_mut();
        headers.insert(REQUEST_ID_HEADER, request_id);
        if progress.attempts > 0 || !progress.waited.is_zero() {
            headers.insert(ATTEMPTS_HEADER, HeaderValue::from(progress.attempts));
            headers.insert(QUEUE_MS_HEADER, HeaderValue::from(progress.waited.as_millis() as u64));
        }
        log.status = response.status().as_u16();
        log.attempts = progress.attempts;
        log.queue_ms = progress.waited.as_millis() as u64;
        log.upstream_status = progress.last_status;
        log.ttfb_ms = progress.ttfb.map(|t| t.as_millis() as u64);
        log.report_to(self.metrics.clone(), progress.ttfb.is_some());
        response.body_mut().log_to(log);
        response
    }

    /// Counts the request's outcome once it has its response.
    fn answered(&self, track: &Track, outcome: &'static str) {
        let progress = &track.progress;
        self.metrics.request_answered(outcome, track.log.model_label.clone(), progress.waited, progress.throttled);
    }

    async fn forward<B>(
        &self,
        generation: &Generation,
        request: Request<B>,
        peer: SocketAddr,
        track: &mut Track,
    ) -> Result<Response<ResponseBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let config = &generation.config;
        let server = &config.server;
        // 1. Refuse what sluice never forwards: CONNECT and absolute-form targets (open-proxy attempts).
        request::refuse_foreign(&request)?;
        // 2. Read the bounded body: retries re-send it and admission reads its model.
        let (parts, body) = request.into_parts();
        // Boxed, like the upstream send: a queued request then carries no room for this state.
        let body = Box::pin(tokio::time::timeout(
            server.body_read_timeout,
            request::read_body(body, &parts.headers, server.max_body_bytes),
        ))
        .await
        .map_err(|_| ProxyError::BadRequest("the request body did not arrive in time".into()))??;
        // 3. Who asks, for which model, how urgently.
        let seen = Inspection::new(&parts.headers, &body, peer, &self.hasher);
        track.log.model = seen.model.as_deref().map(Arc::from);
        track.log.model_label = observe::model_label(seen.model.as_deref(), &config.limits);
        track.log.stream = seen.stream;
        track.log.client = seen.client;
        // 4. The upstream request, built once: header hygiene, key injection, the configured origin only.
        //    It takes the client's request head, so nothing of hyper's read buffer stays pinned.
        let outgoing =
            Outgoing::new(parts, body, &generation.upstream, config.upstream.api_key.as_ref(), &track.request_id)?;
        // 5. Admission, the upstream, retries — until a deliverable response or a final error.
        let deadline = track.log.started() + config.queue.max_wait;
        let (response, permit) =
            self.send_with_retries(generation, &outgoing, &seen, deadline, &mut track.progress).await?;
        // 6. Stream the response back frame by frame; the body holds the slot until it ends.
        Ok(stream_back(response, permit, config.upstream.idle_timeout))
    }
}

/// What is tracked about one request along its path.
struct Track {
    request_id: HeaderValue,
    log: RequestLog,
    progress: Progress,
}

/// The client's response from the upstream's: hop-by-hop headers dropped, the body forwarded as it
/// arrives, the admission slot held until the body ends.
fn stream_back(response: Response<Incoming>, permit: Permit, idle_timeout: Duration) -> Response<ResponseBody> {
    let (mut parts, incoming) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if sse {
        // A broken stream gains an error event, so it must not promise a length.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let mut body = ResponseBody::upstream(incoming, idle_timeout, sse);
    body.hold(permit);
    Response::from_parts(parts, body)
}
