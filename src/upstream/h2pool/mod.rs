//! HTTP/2 to the upstream over as many connections as its stream limit asks for. hyper-util's pool keeps
//! one h2 connection per origin, and requests beyond the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! wait inside it unseen — time the adaptive limit would read as the upstream's latency. While the
//! upstream speaks h2, each runtime sends through its own `H2Pool`: a request takes the least busy
//! connection that has a free stream; when none has one, a new connection is opened, up to
//! `MAX_CONNECTIONS`; past that (or for `CONNECT_COOLDOWN` after a connection could not be made while
//! others serve) the least busy one queues the request, as hyper-util's would. A stream counts as open
//! until its response body ends (`UpstreamBody`).
//!
//! A pool's first connection does not know the server's limit: h2 sends one stream on it and holds a
//! second until the SETTINGS arrive, and further requests wait for them (or its first response, its
//! end, or at most `SETTLE_WINDOW`) before they choose, so a burst is neither refused nor queued
//! unseen. Later connections start from the limit the last SETTINGS said.
//! An unused connection closes after one to two `upstream.pool_idle_timeout`.

mod connection;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;
use tower_service::Service;

use super::{error_chain, Connector, SendError};
pub use connection::UpstreamBody;
use connection::{until_idle, Driver, H2Connection, Handshake, Sender, StreamSlot};

/// At most this many h2 connections per runtime; past them requests queue inside the least busy one.
pub const MAX_CONNECTIONS: usize = 8;

/// How many connections a request takes when the one it took closes (or cannot be made while others
/// serve) before the request went out on it.
const TRIES: usize = 3;

/// How long requests wait, once a pool's first connection is made, for it to announce the server's
/// limit: twice its handshake's duration, within these bounds (the SETTINGS normally come a round trip
/// after it, and end the wait at once); past it they go to the connection as the pool assumes, and h2
/// holds what the server does not allow yet.
const SETTLE_WINDOW: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(2));

/// After a connection could not be made, no other is opened for this long while some still serve.
const CONNECT_COOLDOWN: Duration = Duration::from_secs(5);

/// The streams the pool expects of a connection before any SETTINGS were seen (h2's own default).
const ASSUMED_STREAM_LIMIT: usize = 100;

/// h2 pings a connection with open streams this often, and closes it when no answer comes within
/// `KEEP_ALIVE_TIMEOUT` (a connection that died silently would otherwise hold its streams).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One runtime's h2 connections to the upstream.
pub struct H2Pool {
    connector: Connector,
    origin: Uri,
    /// Bounds the TCP, TLS and h2 handshakes together.
    connect_timeout: Duration,
    idle_timeout: Duration,
    state: Arc<Mutex<PoolState>>,
    /// The server's stream limit as the last SETTINGS seen said (0: none seen yet).
    learned_limit: Arc<AtomicUsize>,
    /// Requests sent again (`sent_again`).
    sent_again: AtomicU64,
}

#[derive(Default)]
struct PoolState {
    connections: Vec<Arc<H2Connection>>,
    /// When a connection last could not be made.
    failed_at: Option<Instant>,
}

impl PoolState {
    fn forget(&mut self, gone: &Arc<H2Connection>) {
        self.connections.retain(|held| !Arc::ptr_eq(held, gone));
    }
}

/// What sending through the pool gave.
pub enum Sent {
    Response(Response<UpstreamBody>),
    /// The upstream no longer offers h2: the request was not sent; send it over HTTP/1.1.
    NotOffered(Request<Full<Bytes>>),
}

/// Which connection a request takes.
#[derive(Debug, PartialEq)]
enum Choice {
    Existing(usize),
    Open,
}

/// The least busy connection with room (`open < limit`, as `(open, limit)` pairs); else a new one if
/// `may_open`; else the least busy one.
fn choose(connections: &[(usize, usize)], may_open: bool) -> Choice {
    let least_busy = |candidates: &mut dyn Iterator<Item = (usize, &(usize, usize))>| {
        candidates.min_by_key(|(_, (open, _))| *open).map(|(index, _)| Choice::Existing(index))
    };
    let with_room = least_busy(&mut connections.iter().enumerate().filter(|(_, (open, limit))| open < limit));
    match with_room {
        Some(choice) => choice,
        None if may_open => Choice::Open,
        None => least_busy(&mut connections.iter().enumerate()).unwrap_or(Choice::Open),
    }
}

impl H2Pool {
    pub fn new(connector: Connector, origin: Uri, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            connector,
            origin,
            connect_timeout,
            idle_timeout,
            state: Arc::default(),
            learned_limit: Arc::new(AtomicUsize::new(0)),
            sent_again: AtomicU64::new(0),
        }
    }

    /// Sends `request` over a connection with a free stream (opening one if needed and allowed). On a
    /// connection that has not settled, requests beyond the first two wait for it to, then choose again.
    /// A connection that closed, could not be made (or did not offer h2) while others serve, or refused
    /// the request unprocessed, is left: the request chooses again (perhaps the same connection, for a
    /// refused stream), up to `TRIES` times.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Sent, SendError> {
        let mut why = String::new();
        let mut tries = 0;
        while tries < TRIES {
            let slot = self.take_stream();
            if slot.must_wait() {
                // Bounded: a connection settles within its settle window, at its first response or end.
                slot.connection.until_settled().await;
                if !slot.connection.closed() {
                    continue; // choose again, now that its limit is known (not a try)
                }
                // It ended before serving: counted as a try, and told below how.
            }
            tries += 1;
            let mut sender = match slot.connection.ready().await {
                Ok(sender) => sender,
                Err(ended @ (Handshake::NotOffered | Handshake::Failed(_))) if !self.any_live() => {
                    return match ended {
                        Handshake::Failed(failed) => Err(SendError::Connect(failed.to_string())),
                        _ => Ok(Sent::NotOffered(request)),
                    };
                }
                Err(Handshake::Failed(failed)) => {
                    why = failed.to_string();
                    continue;
                }
                Err(Handshake::NotOffered) => {
                    why = "a connection's ALPN chose HTTP/1.1".into();
                    continue;
                }
                Err(Handshake::Closed | Handshake::Connecting | Handshake::Ready(_)) => {
                    why = "the upstream closed the HTTP/2 connection".into();
                    continue;
                }
            };
            // Kept until the server has taken the request: one it refused unprocessed goes out again.
            let copy = copy_of(&request);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // A response: the SETTINGS came before it.
                    slot.connection.announce();
                    return Ok(Sent::Response(response.map(|body| UpstreamBody::new(body, Some(slot)))));
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) => {
                        why = error_chain(err.error());
                        request = unsent;
                        self.sent_again.fetch_add(1, Ordering::Relaxed);
                    }
                    None if unprocessed(err.error()) => {
                        why = error_chain(err.error());
                        request = copy;
                        self.sent_again.fetch_add(1, Ordering::Relaxed);
                    }
                    None => return Err(SendError::Reset(error_chain(err.error()))),
                },
            }
        }
        // Each connection tried ended, failed or refused before the request went out on it.
        Err(SendError::Reset(format!("nothing was sent over HTTP/2: {why}")))
    }

    /// Requests given back unsent or refused unprocessed, and sent again.
    pub fn sent_again(&self) -> u64 {
        self.sent_again.load(Ordering::Relaxed)
    }

    fn any_live(&self) -> bool {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).connections.iter().any(|held| held.live())
    }

    /// A stream on the connection `choose` picks, opening it if that is the choice.
    fn take_stream(&self) -> StreamSlot {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.connections.retain(|connection| !connection.closed());
        // (open, limit) of each connection, on the stack: the pool never holds more than MAX_CONNECTIONS.
        let mut seen = [(0, 0); MAX_CONNECTIONS];
        let held = state.connections.len().min(MAX_CONNECTIONS);
        for (slot, connection) in seen.iter_mut().zip(&state.connections) {
            let (limit, announced) = connection.limit();
            if announced {
                self.learned_limit.store(limit, Ordering::Relaxed);
            }
            *slot = (connection.open(), limit);
        }
        let cooling = state.failed_at.is_some_and(|at| at.elapsed() < CONNECT_COOLDOWN);
        // After a failed connect, none is opened while others serve.
        let may_open = state.connections.len() < MAX_CONNECTIONS && (held == 0 || !cooling);
        let connection = match choose(&seen[..held], may_open) {
            Choice::Existing(index) if index < state.connections.len() => Arc::clone(&state.connections[index]),
            Choice::Existing(_) | Choice::Open => {
                let connection = self.connect();
                state.connections.push(Arc::clone(&connection));
                connection
            }
        };
        StreamSlot::take(connection)
    }

    /// Starts opening a connection (in a task of its own, so a cancelled request does not cancel it).
    fn connect(&self) -> Arc<H2Connection> {
        let (tell, state) = watch::channel(Handshake::Connecting);
        let learned = self.learned_limit.load(Ordering::Relaxed);
        // Nothing learned: h2 sends one stream until the SETTINGS come, and the connection settles then;
        // else h2 and the pool start from what the last SETTINGS said.
        let (assumed, h2_initial, learned) = match learned {
            0 => (ASSUMED_STREAM_LIMIT, 1, false),
            learned => (learned, learned, true),
        };
        let connection =
            Arc::new(H2Connection::new(state, assumed, h2_initial, learned, Arc::clone(&self.learned_limit)));
        let (watched, pool, idle) = (Arc::clone(&connection), Arc::clone(&self.state), self.idle_timeout);
        let handshake = handshake(self.connector.clone(), self.origin.clone(), h2_initial);
        let timeout = self.connect_timeout;
        tokio::spawn(async move {
            // However the task ends (a panic in hyper included): waiters choose again, hyper's side is dropped.
            let _ended = TaskEnd(Arc::clone(&watched));
            let started = Instant::now();
            let (sender, conn) = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(parts)) => parts,
                Ok(Err(why)) => return fail(&tell, &pool, &watched, why),
                Err(_) => {
                    let why = format!(
                        "no HTTP/2 connection within {} (upstream.connect_timeout)",
                        humantime::format_duration(timeout)
                    );
                    return fail(&tell, &pool, &watched, Handshake::Failed(why.into()));
                }
            };
            // The server's SETTINGS follow its part of the handshake within a round trip; the TCP and TLS
            // handshakes took at least one.
            let settle_window = (started.elapsed() * 2).clamp(SETTLE_WINDOW.0, SETTLE_WINDOW.1);
            *watched.driver.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
            tell.send_replace(Handshake::Ready(sender));
            let driving = Arc::clone(&watched);
            let driven = std::future::poll_fn(move |cx| {
                let mut driver = driving.driver.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(conn) = driver.as_mut() else { return Poll::Ready(Ok(())) };
                let polled = Pin::new(&mut *conn).poll(cx);
                if !driving.announced() {
                    driving.announce_if_changed(conn.current_max_send_streams());
                }
                polled
            });
            let idle_close = until_idle(&pool, &watched, idle, PoolState::forget);
            let settle_by = tokio::time::sleep(settle_window);
            tokio::pin!(driven, idle_close, settle_by);
            loop {
                tokio::select! {
                    _ = &mut driven => break,
                    () = &mut idle_close => break,
                    () = &mut settle_by, if !watched.settled() => watched.settle(),
                }
            }
            // No request takes it any more; `TaskEnd` then lets waiters choose again and drops hyper's side.
            tell.send_replace(Handshake::Closed);
            pool.lock().unwrap_or_else(PoisonError::into_inner).forget(&watched);
        });
        connection
    }
}

/// Settles a connection and drops hyper's side of it when its task ends, however it ends.
struct TaskEnd(Arc<H2Connection>);

impl Drop for TaskEnd {
    fn drop(&mut self) {
        self.0.settle();
        self.0.driver.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// The request again (its body is shared, not copied); extensions are not carried (none are set).
fn copy_of(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether the request never reached the server's processing: reset with REFUSED_STREAM, or above the
/// last stream of a graceful GOAWAY (RFC 9113 §8.7), or still held back by h2 (waiting for a stream:
/// never written) when hyper's side of the connection ended — hyper says "dispatch task is gone" and
/// names no predicate for it, so the text is matched; should it change, such a request is retried by
/// the retry policy instead, as any other reset. (hyper says the same when a runtime drops its task
/// after a request without a body went out — a shutdown; the retry policy would send that one again
/// too.)
fn unprocessed(err: &hyper::Error) -> bool {
    if err.is_user() && err.to_string().starts_with("dispatch task is gone") {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let graceful_go_away = h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            return graceful_go_away || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = cause.source();
    }
    false
}

/// Connects and shakes hands over h2, telling h2 to keep to `h2_initial` streams until the server's
/// SETTINGS say; `Err` is the state to tell the requests that wait.
async fn handshake(mut connector: Connector, origin: Uri, h2_initial: usize) -> Result<(Sender, Driver), Handshake> {
    let failed = |err: Box<dyn std::error::Error + Send + Sync>| Handshake::Failed(error_chain(&*err).into());
    std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(failed)?;
    let io = connector.call(origin).await.map_err(failed)?;
    if !io.connected().is_negotiated_h2() {
        return Err(Handshake::NotOffered);
    }
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_max_send_streams(h2_initial)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    builder.handshake(io).await.map_err(|err| Handshake::Failed(error_chain(&err).into()))
}

/// The connection could not be made (or did not offer h2): whoever waits for it is told, and the pool
/// forgets it (and, when others serve, opens no other for `CONNECT_COOLDOWN`).
fn fail(tell: &watch::Sender<Handshake>, pool: &Mutex<PoolState>, connection: &Arc<H2Connection>, why: Handshake) {
    let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
    pool.forget(connection);
    if pool.connections.iter().any(|held| held.live()) {
        pool.failed_at = Some(Instant::now());
    }
    drop(pool);
    tell.send_replace(why);
    // The task returns next: its `TaskEnd` settles the connection.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_takes_the_least_busy_connection_with_room_else_a_new_one_else_the_least_busy() {
        assert_eq!(choose(&[], true), Choice::Open);
        assert_eq!(choose(&[], false), Choice::Open, "no connection at all: one is opened");
        assert_eq!(choose(&[(2, 2), (1, 2), (0, 2)], true), Choice::Existing(2));
        assert_eq!(choose(&[(2, 2), (1, 2)], true), Choice::Existing(1));
        assert_eq!(choose(&[(2, 2), (2, 2)], true), Choice::Open);
        assert_eq!(choose(&[(3, 2), (2, 2)], false), Choice::Existing(1), "full and none may open: least busy");
        assert_eq!(choose(&[(5, 100), (1, 1)], true), Choice::Existing(0), "room counts before business");
    }
}
