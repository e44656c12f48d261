//! The listener: accepts connections (one task each) and serves HTTP/1.1 and h2c through hyper-util,
//! with header size and read-time limits; answers the reserved endpoints (`/healthz`, `/readyz`, and the
//! operator endpoints of `observe::endpoints`); hands
//! every other request to the proxy; and on shutdown stops accepting and lets in-flight work finish
//! within `server.shutdown_grace`, then turns away what is still queued with a 503.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::observe::endpoints::{self, Endpoint};
use crate::proxy::{Proxy, ResponseBody};

/// What the connection tasks share.
struct Shared {
    proxy: Arc<Proxy>,
    /// False once shutdown has begun: `/readyz` then answers 503.
    ready: AtomicBool,
}

/// Serves `listener` until `shutdown` completes, then drains: no new connections, in-flight requests
/// and streams get up to `server.shutdown_grace` to finish.
pub async fn run(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let server_config = proxy.current().config.server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_config.header_read_timeout)
        .max_buf_size(server_config.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server_config.max_header_bytes).unwrap_or(u32::MAX));
    let shared = Arc::new(Shared { proxy, ready: AtomicBool::new(true) });
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
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = service_fn(move |request| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(&shared, request, peer).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    // Drain: /readyz says 503 from now on, no new connections; queued requests keep their place and
    // are dispatched, streams finish — for up to `shutdown_grace` (as in force now, after reloads).
    shared.ready.store(false, Ordering::SeqCst);
    drop(listener);
    let grace = shared.proxy.current().config.server.shutdown_grace;
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining connections");
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_err() {
        // Whoever still waits in the queue gets a clear 503 instead of a cut connection.
        let left = shared.proxy.admission().snapshot();
        tracing::warn!(queued = left.queued, in_flight = left.inflight, "shutdown grace ended; turning away the queue");
        shared.proxy.admission().close();
        let _ = tokio::time::timeout(FAREWELL, &mut drained).await;
    }
}

/// After the grace period, how long the 503s to still-queued requests get to reach their clients.
const FAREWELL: Duration = Duration::from_secs(1);

/// Reserved paths are answered here and never forwarded; everything else goes to the proxy.
async fn route(shared: &Shared, request: Request<Incoming>, peer: SocketAddr) -> Response<ResponseBody> {
    let path = request.uri().path();
    if let Some(endpoint) = Endpoint::of(path) {
        return endpoints::answer(endpoint, &request, &shared.proxy);
    }
    match path {
        "/healthz" => status_json(StatusCode::OK, "ok"),
        "/readyz" if shared.ready.load(Ordering::SeqCst) => status_json(StatusCode::OK, "ready"),
        "/readyz" => status_json(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        _ => shared.proxy.handle(request, peer).await,
    }
}

fn status_json(status: StatusCode, text: &str) -> Response<ResponseBody> {
    let body = Bytes::from(serde_json::json!({ "status": text }).to_string());
    ResponseBody::response(status, "application/json", body)
}
