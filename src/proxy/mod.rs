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
use std::sync::Arc;
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
use crate::observe::RequestLog;
use crate::upstream::{BuildError, Upstream};
use attempts::Progress;
use request::{Inspection, Outgoing};

/// Response header: upstream attempts this request took.
pub const ATTEMPTS_HEADER: &str = "x-sluice-attempts";
/// Response header: milliseconds the request spent waiting (queue and backoff).
pub const QUEUE_MS_HEADER: &str = "x-sluice-queue-ms";

/// Everything a request needs on its way: the config, the upstream client, admission.
pub struct Proxy {
    config: Arc<Config>,
    upstream: Upstream,
    admission: Admission,
    /// Keys the client-identity hash; random per process, so hashes mean nothing elsewhere.
    hasher: RandomState,
}

impl Proxy {
    /// Builds the proxy and starts admission's dispatcher (needs a tokio runtime).
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let upstream = Upstream::new(&config.upstream)?;
        let admission = Admission::new(&config.limits, &config.queue, &config.retry);
        Ok(Self {
            config: Arc::new(config),
            upstream,
            admission,
            hasher: RandomState::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Answers one client request (any path but the reserved ones).
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let arrived = Instant::now();
        let request_id = request::request_id(request.headers());
        let mut log = RequestLog::new(
            request_id.to_str().unwrap_or("-").to_owned(),
            request.method().clone(),
            request.uri().path(),
            arrived,
        );
        let mut progress = Progress::default();
        let mut response = match self
            .forward(request, peer, arrived, &request_id, &mut log, &mut progress)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                log.error = Some(err.kind());
                tracing::debug!(request_id = %log.request_id, error = %err, "answering with sluice's own error");
                err.into_response()
            }
        };
        let headers = response.headers_mut();
        headers.insert(REQUEST_ID_HEADER, request_id);
        if progress.attempts > 0 || !progress.waited.is_zero() {
            headers.insert(ATTEMPTS_HEADER, HeaderValue::from(progress.attempts));
            headers.insert(
                QUEUE_MS_HEADER,
                HeaderValue::from(progress.waited.as_millis() as u64),
            );
        }
        log.status = response.status().as_u16();
        log.attempts = progress.attempts;
        log.queue_ms = progress.waited.as_millis() as u64;
        response.body_mut().log_to(log);
        response
    }

    async fn forward<B>(
        &self,
        request: Request<B>,
        peer: SocketAddr,
        arrived: Instant,
        request_id: &HeaderValue,
        log: &mut RequestLog,
        progress: &mut Progress,
    ) -> Result<Response<ResponseBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let server = &self.config.server;
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
        log.model = seen.model.as_deref().map(Arc::from);
        log.stream = seen.stream;
        log.client = seen.client;
        // 4. The upstream request, built once: header hygiene, key injection, the configured origin only.
        //    It takes the client's request head, so nothing of hyper's read buffer stays pinned.
        let outgoing = Outgoing::new(
            parts,
            body,
            &self.upstream,
            self.config.upstream.api_key.as_ref(),
            request_id,
        )?;
        // 5. Admission, the upstream, retries — until a deliverable response or a final error.
        let deadline = arrived + self.config.queue.max_wait;
        let (response, permit) = self
            .send_with_retries(&outgoing, &seen, deadline, progress)
            .await?;
        // 6. Stream the response back frame by frame; the body holds the slot until it ends.
        Ok(stream_back(
            response,
            permit,
            self.config.upstream.idle_timeout,
        ))
    }
}

/// The client's response from the upstream's: hop-by-hop headers dropped, the body forwarded as it
/// arrives, the admission slot held until the body ends.
fn stream_back(
    response: Response<Incoming>,
    permit: Permit,
    idle_timeout: Duration,
) -> Response<ResponseBody> {
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
