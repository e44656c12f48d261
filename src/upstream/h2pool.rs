//! HTTP/2 to the upstream over as many connections as its stream limit asks for. hyper-util's pool keeps
//! one h2 connection per origin, and requests beyond the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! wait inside it unseen — time the adaptive limit would read as the upstream's latency. Once the
//! upstream has answered over h2, each runtime sends through its own `H2Pool`: a request takes the
//! least busy connection that has a free stream, a new connection is opened (one at a time; the
//! requests that need it wait for it) when every one is at the server's limit, up to `MAX_CONNECTIONS`;
//! past that the least busy one queues the request, as hyper-util's would. A stream counts as open until
//! its response body ends (`UpstreamBody`). An unused connection closes after `upstream.pool_idle_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower_service::Service;

use super::{error_chain, Connector, SendError};

/// At most this many h2 connections per runtime; past them requests queue inside the least busy one.
pub const MAX_CONNECTIONS: usize = 8;

/// How many connections a request takes when the one it took closes before the request went out.
const TRIES: usize = 2;

/// What a request that chose a connection as it closed is told (if no other connection takes it).
const CLOSED: &str = "the upstream closed the HTTP/2 connection";

/// The streams a first connection is assumed to allow until the server's SETTINGS say (h2's own
/// default); later connections assume what the last one learned.
const ASSUMED_STREAM_LIMIT: usize = 100;

/// One runtime's h2 connections to the upstream.
pub struct H2Pool {
    connector: Connector,
    origin: Uri,
    /// Bounds the TCP, TLS and h2 handshakes together.
    connect_timeout: Duration,
    idle_timeout: Duration,
    connections: Arc<Mutex<Vec<Arc<H2Connection>>>>,
    /// The server's stream limit as its last SETTINGS said (`ASSUMED_STREAM_LIMIT` before any).
    learned_limit: Arc<AtomicUsize>,
}

/// A connection: its sender once the handshake is done, and how many streams it has open and allows.
struct H2Connection {
    state: watch::Receiver<Handshake>,
    /// The connection itself once handshaken, driven by its task and asked for the server's limit.
    driver: Mutex<Option<Driver>>,
    open: AtomicUsize,
    /// The limit until the connection can say (the pool's learned one when it was opened).
    assumed_limit: usize,
    /// Taken or given back since the idle check last looked.
    used: AtomicBool,
}

/// hyper's side of an h2 connection over the upstream's TLS stream.
type Driver = http2::Connection<MaybeHttpsStream<TokioIo<TcpStream>>, Full<Bytes>, TokioExecutor>;
type Sender = http2::SendRequest<Full<Bytes>>;

/// Where a connection's handshake stands.
#[derive(Clone)]
enum Handshake {
    Connecting,
    Ready(Sender),
    /// The upstream did not offer h2 on this connection (ALPN chose HTTP/1.1).
    NotOffered,
    /// It could not be made.
    Failed(Arc<str>),
    /// It was made and has ended (closed by the server, an error, or idleness).
    Closed,
}

/// What sending through the pool gave.
pub enum Sent {
    Response(Response<UpstreamBody>),
    /// The upstream no longer offers h2: the request was not sent; send it over HTTP/1.1.
    NotOffered(Request<Full<Bytes>>),
}

impl H2Pool {
    pub fn new(connector: Connector, origin: Uri, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            connector,
            origin,
            connect_timeout,
            idle_timeout,
            connections: Arc::default(),
            learned_limit: Arc::new(AtomicUsize::new(ASSUMED_STREAM_LIMIT)),
        }
    }

    /// Sends `request` over a connection with a free stream (opening one if needed and allowed). A
    /// connection that closed before the request went out on it is left for another, once.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Sent, SendError> {
        let mut why = String::new();
        for _ in 0..TRIES {
            let slot = self.take_stream();
            let mut sender = match slot.connection.ready().await {
                Ok(sender) => sender,
                Err(Handshake::NotOffered) => return Ok(Sent::NotOffered(request)),
                Err(Handshake::Failed(failed)) => return Err(SendError::Connect(failed.to_string())),
                Err(Handshake::Closed | Handshake::Connecting | Handshake::Ready(_)) => {
                    why = CLOSED.into();
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

    /// A stream on the least busy connection with room, or on a new connection when none has room and
    /// another is allowed (else on the least busy one).
    fn take_stream(&self) -> StreamSlot {
        let mut connections = self.connections.lock().unwrap_or_else(PoisonError::into_inner);
        connections.retain(|connection| !connection.closed());
        let mut with_room: Option<&Arc<H2Connection>> = None;
        for connection in connections.iter() {
            let limit = connection.limit();
            self.learned_limit.store(limit, Ordering::Relaxed);
            let open = connection.open();
            if open < limit && with_room.is_none_or(|best| open < best.open()) {
                with_room = Some(connection);
            }
        }
        let connection = match with_room {
            Some(connection) => Arc::clone(connection),
            None if connections.len() < MAX_CONNECTIONS => {
                let connection = self.connect();
                connections.push(Arc::clone(&connection));
                connection
            }
            None => match connections.iter().min_by_key(|connection| connection.open()) {
                Some(connection) => Arc::clone(connection),
                None => self.connect(), // unreachable: MAX_CONNECTIONS is above zero
            },
        };
        StreamSlot::take(connection)
    }

    /// Starts opening a connection (in a task of its own, so a cancelled request does not cancel it).
    fn connect(&self) -> Arc<H2Connection> {
        let (tell, state) = watch::channel(Handshake::Connecting);
        let assumed = self.learned_limit.load(Ordering::Relaxed);
        let connection = Arc::new(H2Connection {
            state,
            driver: Mutex::default(),
            open: AtomicUsize::new(0),
            assumed_limit: assumed,
            used: AtomicBool::new(true),
        });
        let (watched, pool, idle) = (Arc::clone(&connection), Arc::clone(&self.connections), self.idle_timeout);
        let handshake = handshake(self.connector.clone(), self.origin.clone(), assumed);
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
                () = until_idle(&pool, &watched, idle) => {}
            }
            // No request takes it any more.
            tell.send_replace(Handshake::Closed);
            forget(&pool, &watched);
            watched.driver.lock().unwrap_or_else(PoisonError::into_inner).take();
        });
        connection
    }
}

/// Connects and shakes hands over h2, telling h2 to keep to `assumed` streams until the server's
/// SETTINGS say; `Err` is the state to tell the requests that wait.
async fn handshake(mut connector: Connector, origin: Uri, assumed: usize) -> Result<(Sender, Driver), Handshake> {
    let failed = |err: Box<dyn std::error::Error + Send + Sync>| Handshake::Failed(error_chain(&*err).into());
    std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(failed)?;
    let io = connector.call(origin).await.map_err(failed)?;
    if !io.connected().is_negotiated_h2() {
        return Err(Handshake::NotOffered);
    }
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new()).initial_max_send_streams(assumed);
    builder.handshake(io).await.map_err(|err| Handshake::Failed(error_chain(&err).into()))
}

/// The connection could not be made: whoever waits for it is told, and the pool forgets it.
fn fail(
    tell: &watch::Sender<Handshake>,
    pool: &Mutex<Vec<Arc<H2Connection>>>,
    connection: &Arc<H2Connection>,
    why: Handshake,
) {
    tell.send_replace(why);
    forget(pool, connection);
}

fn forget(pool: &Mutex<Vec<Arc<H2Connection>>>, connection: &Arc<H2Connection>) {
    pool.lock().unwrap_or_else(PoisonError::into_inner).retain(|held| !Arc::ptr_eq(held, connection));
}

/// Returns once the connection had no open stream and was not taken for a whole `idle` period; it is
/// then out of the pool (under the pool's lock, so no request can take it in between).
async fn until_idle(pool: &Mutex<Vec<Arc<H2Connection>>>, connection: &Arc<H2Connection>, idle: Duration) {
    loop {
        tokio::time::sleep(idle).await;
        let mut connections = pool.lock().unwrap_or_else(PoisonError::into_inner);
        let used = connection.used.swap(false, Ordering::Relaxed);
        if !used && connection.open.load(Ordering::Relaxed) == 0 {
            connections.retain(|held| !Arc::ptr_eq(held, connection));
            return;
        }
    }
}

impl H2Connection {
    /// Its sender once the handshake is done, or how it ended.
    async fn ready(&self) -> Result<Sender, Handshake> {
        let mut state = self.state.clone();
        let settled = match state.wait_for(|state| !matches!(state, Handshake::Connecting)).await {
            Ok(settled) => settled.clone(),
            // The connecting task ended without saying: it was cancelled (the runtime is stopping).
            Err(_) => Handshake::Failed("the connection attempt was cancelled".into()),
        };
        match settled {
            Handshake::Ready(sender) => Ok(sender),
            ended => Err(ended),
        }
    }

    /// The server's stream limit as its SETTINGS say (read now: h2 applies them as they arrive).
    fn limit(&self) -> usize {
        let driver = self.driver.lock().unwrap_or_else(PoisonError::into_inner);
        driver.as_ref().map_or(self.assumed_limit, Driver::current_max_send_streams).max(1)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn closed(&self) -> bool {
        match &*self.state.borrow() {
            Handshake::Connecting => false,
            Handshake::Ready(sender) => sender.is_closed(),
            Handshake::NotOffered | Handshake::Failed(_) | Handshake::Closed => true,
        }
    }
}

/// A stream counted against its connection until dropped.
struct StreamSlot {
    connection: Arc<H2Connection>,
}

impl StreamSlot {
    fn take(connection: Arc<H2Connection>) -> Self {
        connection.open.fetch_add(1, Ordering::Relaxed);
        connection.used.store(true, Ordering::Relaxed);
        Self { connection }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // Given back counts as used: the idle period starts now.
        self.connection.used.store(true, Ordering::Relaxed);
        self.connection.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream response's body; over the h2 pool it holds its stream's place until it ends.
pub struct UpstreamBody {
    incoming: Incoming,
    slot: Option<StreamSlot>,
}

impl UpstreamBody {
    fn new(incoming: Incoming, slot: Option<StreamSlot>) -> Self {
        Self { incoming, slot }
    }

    /// A body that holds no stream count (HTTP/1.1, or hyper-util's pool).
    pub fn unpooled(incoming: Incoming) -> Self {
        Self::new(incoming, None)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(assumed_limit: usize) -> (watch::Sender<Handshake>, Arc<H2Connection>) {
        let (tell, state) = watch::channel(Handshake::Connecting);
        let connection = H2Connection {
            state,
            driver: Mutex::default(),
            open: AtomicUsize::new(0),
            assumed_limit,
            used: AtomicBool::new(false),
        };
        (tell, Arc::new(connection))
    }

    #[test]
    fn a_slot_counts_a_stream_until_dropped() {
        let (_tell, held) = connection(2);
        let first = StreamSlot::take(Arc::clone(&held));
        let second = StreamSlot::take(Arc::clone(&held));
        assert_eq!((held.open(), held.limit()), (2, 2), "two of two streams open");
        assert!(held.used.load(Ordering::Relaxed));
        drop(first);
        assert_eq!(held.open(), 1);
        drop(second);
        assert_eq!(held.open(), 0);
    }

    #[test]
    fn a_connection_still_connecting_is_not_closed_and_one_that_failed_is() {
        let (tell, held) = connection(0);
        assert!(!held.closed());
        assert_eq!(held.limit(), 1, "a limit of zero streams still lets one through");
        tell.send_replace(Handshake::Failed("refused".into()));
        assert!(held.closed());
        let (tell, refused) = connection(1);
        tell.send_replace(Handshake::NotOffered);
        assert!(refused.closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_leaves_the_pool_after_a_whole_idle_period_without_streams() {
        let idle = Duration::from_secs(90);
        let (_tell, held) = connection(2);
        let pool = Mutex::new(vec![Arc::clone(&held)]);
        let slot = StreamSlot::take(Arc::clone(&held));
        let busy = tokio::time::timeout(idle * 5, until_idle(&pool, &held, idle)).await;
        assert!(busy.is_err(), "a connection with an open stream stays");
        drop(slot);
        let started = tokio::time::Instant::now();
        until_idle(&pool, &held, idle).await;
        // Given back just now: a whole period without use after the one it was given back in.
        assert_eq!(started.elapsed(), idle * 2);
        assert!(pool.lock().unwrap().is_empty());
    }
}
