//! The listener: accepts connections (one task each, at most `server.max_connections`) and serves
//! HTTP/1.1 (hyper's own connection when the first bytes can only be HTTP/1) and h2c (hyper-util's
//! either-protocol connection), with header size, read-time, idle and write-stall limits
//! (`connection.rs`); answers the reserved endpoints (`/healthz`, `/readyz`, `/favicon.ico` and the
//! operator endpoints of `observe::endpoints`); hands every other request to the proxy, rescuing a panic
//! into a 500; and on shutdown stops accepting, lets in-flight work finish within
//! `server.shutdown_grace`, then tells whatever is left to answer at once. Each of the daemon's runtime
//! threads serves its own listening socket through the one `Server`: the connection cap and the drain
//! are shared.

mod connection;
mod relay;
pub mod runtimes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::catch_unwind::{panic_message, CatchUnwind};
use crate::error::ProxyError;
use crate::observe::endpoints::{self, Endpoint};
use crate::proxy::{BoxError, Proxy, ResponseBody};
use connection::{ConnIo, ConnLimits, ConnState, Protocol};

/// HTTP/2 keep-alive pings: how often, and how long an answer may take before the connection is closed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What the connection tasks share.
struct Shared {
    proxy: Arc<Proxy>,
    /// True once shutdown has begun: `/readyz` then answers 503, and connections that have not sent a
    /// byte yet are closed.
    draining: watch::Sender<bool>,
    /// Client connections open now.
    connections: AtomicUsize,
}

/// Serves `listener` until `shutdown` completes, then drains: no new connections, in-flight requests
/// and streams get up to `server.shutdown_grace` to finish.
pub async fn run(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    Server::new(proxy).serve(listener, shutdown).await;
}

/// The server every runtime thread accepting on the listener shares: the connection count, the drain,
/// and the connection builders.
pub struct Server {
    shared: Arc<Shared>,
    /// Connections whose first bytes can only be HTTP/1 get hyper's HTTP/1 connection; the others the
    /// either-protocol one.
    builders: Arc<(http1::Builder, auto::Builder<TokioExecutor>)>,
    header_read_timeout: Duration,
}

impl Server {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        let server_config = proxy.current().config.server.clone();
        // Both builders read HTTP/1 with the same limits, set in one place.
        macro_rules! http1_limits {
            ($builder:expr) => {
                $builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(server_config.header_read_timeout)
                    .max_buf_size(server_config.max_header_bytes)
            };
        }
        let mut http1 = http1::Builder::new();
        http1_limits!(http1);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        http1_limits!(builder.http1());
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .max_header_list_size(u32::try_from(server_config.max_header_bytes).unwrap_or(u32::MAX));
        let (draining, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared { proxy, draining, connections: AtomicUsize::new(0) }),
            builders: Arc::new((http1, builder)),
            header_read_timeout: server_config.header_read_timeout,
        }
    }

    /// Accepts on `listener` (each serving runtime has its own, on the same port) until `shutdown`
    /// completes, then drains what this thread serves: no new connections, in-flight requests and
    /// streams get up to `server.shutdown_grace` to finish.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let shared = &self.shared;
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause instead of spinning, keep serving.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Over the cap: closed at once, before any work is done for it.
            let config = shared.proxy.current();
            let max = config.config.server.max_connections;
            let Some(counted) = Counted::take(shared, max) else {
                tracing::debug!(%peer, max, "connection refused: server.max_connections reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::new(ConnState::default());
            let limits = ConnLimits {
                first_request: self.header_read_timeout,
                idle: config.config.server.idle_timeout,
                write_stall: config.config.upstream.idle_timeout,
            };
            let io = ConnIo::new(stream, state.clone(), limits);
            let service = {
                let shared = shared.clone();
                service_fn(move |request| {
                    let shared = shared.clone();
                    let state = state.clone();
                    // Boxed before the future is made: hyper holds this future for the request's whole
                    // life, and an unboxed request would be stored in it twice (here and in `serve`'s frame).
                    let request = Box::new(request);
                    async move { Ok::<_, Infallible>(serve(&shared, request, peer, state).await) }
                })
            };
            let (builders, watcher, mut draining) =
                (self.builders.clone(), graceful.watcher(), shared.draining.subscribe());
            tokio::spawn(async move {
                let _counted = counted; // the connection counts until this task ends, however it ends
                let protocol = tokio::select! {
                    biased;
                    _ = draining.wait_for(|draining| *draining) => return,
                    protocol = io.sniff() => protocol,
                };
                drop(draining);
                let (http1, builder) = &*builders;
                // Each connection boxed: awaited in place, it would be stored twice in this task's future
                // (the value and the awaited one), and the HTTP/2 one's room taken by every HTTP/1 connection.
                let ended: Result<(), BoxError> = match protocol {
                    Ok(Protocol::Http1) => {
                        let connection = http1.serve_connection(TokioIo::new(io), service);
                        Box::pin(watcher.watch(connection)).await.map_err(BoxError::from)
                    }
                    Ok(Protocol::Undecided) => {
                        let connection = builder.serve_connection(TokioIo::new(io), service);
                        Box::pin(watcher.watch(connection)).await
                    }
                    Err(err) => Err(err.into()),
                };
                if let Err(err) = ended {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
            });
        }
        // Drain: /readyz says 503 from now on, no new connections; queued requests keep their place and
        // are dispatched, streams finish — for up to `shutdown_grace` (as in force now, after reloads).
        let first = !shared.draining.send_replace(true);
        drop(listener);
        let grace = shared.proxy.current().config.server.shutdown_grace;
        if first {
            tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining connections");
        }
        let drained = graceful.shutdown();
        tokio::pin!(drained);
        if tokio::time::timeout(grace, &mut drained).await.is_err() {
            // Whoever is still on its way answers now: a clear 503, or an error event for a stream.
            let left = shared.proxy.admission().snapshot();
            tracing::warn!(
                queued = left.queued,
                in_flight = left.inflight,
                "shutdown grace ended; answering what is left"
            );
            shared.proxy.stop_all();
            let _ = tokio::time::timeout(FAREWELL, &mut drained).await;
        }
    }
}

/// After the grace period, how long the last answers get to reach their clients.
pub const FAREWELL: Duration = Duration::from_secs(2);

/// One request: counted on its connection until its response ends, and rescued should it panic. An
/// HTTP/2 stream's body goes through a relay that notices a client granting no window.
async fn serve(
    shared: &Shared,
    request: Box<Request<Incoming>>,
    peer: SocketAddr,
    state: Arc<ConnState>,
) -> Response<ResponseBody> {
    let in_progress = state.request_started();
    let http2 = request.version() == http::Version::HTTP_2;
    let mut response = match CatchUnwind::new(route(shared, request, peer)).await {
        Ok(response) => response,
        Err(panic) => {
            shared.proxy.metrics().panicked();
            tracing::error!(panic = panic_message(&*panic), "a request failed inside sluice; answering 500");
            ProxyError::Internal("a bug while handling this request".into()).into_response()
        }
    };
    if http2 && !response.body().is_full() {
        let stall = shared.proxy.current().config.upstream.idle_timeout;
        response = response.map(|body| relay::relay(body, stall));
    }
    response.body_mut().attach(in_progress);
    response
}

/// A connection counted against `server.max_connections` until dropped.
struct Counted(Arc<Shared>);

impl Counted {
    fn take(shared: &Arc<Shared>, max: usize) -> Option<Self> {
        let counter = &shared.connections;
        let taken = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1));
        taken.ok().map(|_| Self(shared.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reserved paths are answered here and never forwarded; everything else goes to the proxy.
async fn route(shared: &Shared, request: Box<Request<Incoming>>, peer: SocketAddr) -> Response<ResponseBody> {
    let path = request.uri().path();
    if let Some(endpoint) = Endpoint::of(path) {
        return endpoints::answer(endpoint, &request, &shared.proxy);
    }
    match path {
        "/healthz" => status_json(StatusCode::OK, "ok"),
        "/readyz" if !*shared.draining.borrow() => status_json(StatusCode::OK, "ready"),
        "/readyz" => status_json(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        // Browsers ask for it next to /dashboard: answered here, never forwarded with the key.
        "/favicon.ico" => ResponseBody::response(StatusCode::NO_CONTENT, "image/x-icon", Bytes::new()),
        _ => shared.proxy.handle(request, peer).await,
    }
}

fn status_json(status: StatusCode, text: &str) -> Response<ResponseBody> {
    let body = Bytes::from(serde_json::json!({ "status": text }).to_string());
    ResponseBody::response(status, "application/json", body)
}
