//! HTTP/2 to the upstream over as many connections as its stream limit asks for. hyper-util's pool keeps
//! one h2 connection per origin, and requests beyond the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! wait inside it unseen — time the adaptive limit would read as the upstream's latency. Once the
//! upstream has answered over h2, each runtime sends through its own `H2Pool`: a request takes the
//! least busy connection that has a free stream; when none has one, a new connection is opened (the
//! requests that find it connecting wait for it, up to the limit the pool expects), up to
//! `MAX_CONNECTIONS`; past that, or for a while after a connection could not be made while others
//! serve, the least busy one queues the request, as hyper-util's would. Until a connection's first
//! SETTINGS arrive, h2 sends one stream on it (never more than any server allows) and the pool plans
//! with the limit the last SETTINGS announced. A stream counts as open until its response body ends
//! (`UpstreamBody`). An unused connection closes after one to two `upstream.pool_idle_timeout`.

mod connection;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
const TRIES: usize = 2;

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
        }
    }

    /// Sends `request` over a connection with a free stream (opening one if needed and allowed). A
    /// connection that closed, or could not be made while others serve, before the request went out on
    /// it is left for another, once.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Sent, SendError> {
        let mut why = String::new();
        for _ in 0..TRIES {
            let slot = self.take_stream();
            let mut sender = match slot.connection.ready().await {
                Ok(sender) => sender,
                Err(Handshake::NotOffered) => return Ok(Sent::NotOffered(request)),
                Err(Handshake::Failed(failed)) if !self.any_live() => {
                    return Err(SendError::Connect(failed.to_string()))
                }
                Err(Handshake::Failed(failed)) => {
                    why = failed.to_string();
                    continue;
                }
                Err(Handshake::Closed | Handshake::Connecting | Handshake::Ready(_)) => {
                    why = "the upstream closed the HTTP/2 connection".into();
                    continue;
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(Sent::Response(response.map(|body| UpstreamBody::new(body, Some(slot))))),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => {
                        why = error_chain(err.error());
                        request = unsent;
                    }
                    None => return Err(SendError::Reset(error_chain(err.error()))),
                },
            }
        }
        Err(SendError::Connect(format!("nothing was sent over HTTP/2: {why}")))
    }

    fn any_live(&self) -> bool {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).connections.iter().any(|held| held.live())
    }

    /// A stream on the connection `choose` picks, opening it if that is the choice.
    fn take_stream(&self) -> StreamSlot {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.connections.retain(|connection| !connection.closed());
        let mut seen = Vec::with_capacity(state.connections.len());
        for connection in &state.connections {
            let (limit, announced) = connection.limit();
            if announced {
                self.learned_limit.store(limit, Ordering::Relaxed);
            }
            seen.push((connection.open(), limit));
        }
        let cooling = state.failed_at.is_some_and(|at| at.elapsed() < CONNECT_COOLDOWN);
        // After a failed connect, none is opened while others serve.
        let may_open = seen.len() < MAX_CONNECTIONS && (seen.is_empty() || !cooling);
        let connection = match choose(&seen, may_open) {
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
        // Nothing learned: h2 sends one stream until the SETTINGS come; the pool expects h2's default.
        let (assumed, h2_initial) = match learned {
            0 => (ASSUMED_STREAM_LIMIT, 1),
            learned => (learned, learned),
        };
        let connection = Arc::new(H2Connection::new(state, assumed, h2_initial));
        let (watched, pool, idle) = (Arc::clone(&connection), Arc::clone(&self.state), self.idle_timeout);
        let handshake = handshake(self.connector.clone(), self.origin.clone(), h2_initial);
        let timeout = self.connect_timeout;
        tokio::spawn(async move {
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
            *watched.driver.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
            tell.send_replace(Handshake::Ready(sender));
            let driving = Arc::clone(&watched);
            let driven = std::future::poll_fn(move |cx| {
                let mut driver = driving.driver.lock().unwrap_or_else(PoisonError::into_inner);
                match driver.as_mut() {
                    Some(conn) => Pin::new(conn).poll(cx),
                    None => Poll::Ready(Ok(())),
                }
            });
            tokio::select! {
                _ = driven => {}
                () = until_idle(&pool, &watched, idle, PoolState::forget) => {}
            }
            // No request takes it any more.
            tell.send_replace(Handshake::Closed);
            pool.lock().unwrap_or_else(PoisonError::into_inner).forget(&watched);
            watched.driver.lock().unwrap_or_else(PoisonError::into_inner).take();
        });
        connection
    }
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
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    builder.handshake(io).await.map_err(|err| Handshake::Failed(error_chain(&err).into()))
}

/// The connection could not be made: whoever waits for it is told, and the pool forgets it (and
/// opens no other for `CONNECT_COOLDOWN` while some still serve).
fn fail(tell: &watch::Sender<Handshake>, pool: &Mutex<PoolState>, connection: &Arc<H2Connection>, why: Handshake) {
    let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
    if matches!(why, Handshake::Failed(_)) {
        pool.failed_at = Some(Instant::now());
    }
    pool.forget(connection);
    drop(pool);
    tell.send_replace(why);
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
