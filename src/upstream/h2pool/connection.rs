//! One h2 connection of the pool: its handshake's state, hyper's connection (driven by its task, asked
//! for the server's stream limit), the streams counted on it (`StreamSlot`), the response body that
//! holds a stream until it ends (`UpstreamBody`), and when an unused connection leaves.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// hyper's side of an h2 connection over the upstream's TLS stream.
pub(super) type Driver = http2::Connection<MaybeHttpsStream<TokioIo<TcpStream>>, Full<Bytes>, TokioExecutor>;
pub(super) type Sender = http2::SendRequest<Full<Bytes>>;

/// The idle check never runs more often than this (`pool_idle_timeout` may be zero).
const MIN_IDLE_CHECK: Duration = Duration::from_millis(100);

/// Where a connection's handshake stands.
#[derive(Clone)]
pub(super) enum Handshake {
    Connecting,
    Ready(Sender),
    /// The upstream did not offer h2 on this connection (ALPN chose HTTP/1.1).
    NotOffered,
    /// It could not be made.
    Failed(Arc<str>),
    /// It was made and has ended (closed by the server, an error, or idleness).
    Closed,
}

/// Requests sent on a connection before it has settled: one stream goes out, one waits inside h2 (its
/// opening is what wakes the connection's task when the SETTINGS arrive); the rest wait in the pool.
pub(super) const UNSETTLED_SENDS: usize = 2;

/// A connection: its sender once the handshake is done, and how many streams it has open and allows.
pub(super) struct H2Connection {
    state: watch::Receiver<Handshake>,
    /// The connection itself once handshaken, driven by its task and asked for the server's limit.
    pub(super) driver: Mutex<Option<Driver>>,
    open: AtomicUsize,
    /// The stream limit the pool plans with until h2 reports the server's.
    assumed_limit: usize,
    /// The limit h2 itself keeps to until the server's SETTINGS (what `current_max_send_streams` says
    /// before them).
    h2_initial: usize,
    /// h2 reports the server's limit: its SETTINGS changed h2's start value or a response came (the
    /// SETTINGS precede it), or the limit was learned before the connection was opened.
    announced: AtomicBool,
    /// Requests beyond `UNSETTLED_SENDS` no longer wait: the limit was announced, the settle window
    /// passed, or the connection ended.
    settled: AtomicBool,
    /// Told when the connection settles.
    settling: Notify,
    /// The pool's learned limit: an announced limit is stored there at once (the connection may end
    /// before another request looks).
    learned: Arc<AtomicUsize>,
    /// Taken or given back since the idle check last looked.
    used: AtomicBool,
}

impl H2Connection {
    /// A connection planned with `assumed_limit` streams and started by h2 at `h2_initial`; `known`
    /// when that limit is what an earlier connection's SETTINGS said (kept in `learned`).
    pub(super) fn new(
        state: watch::Receiver<Handshake>,
        assumed_limit: usize,
        h2_initial: usize,
        known: bool,
        learned: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            state,
            driver: Mutex::default(),
            open: AtomicUsize::new(0),
            assumed_limit,
            h2_initial,
            announced: AtomicBool::new(known),
            settled: AtomicBool::new(known),
            settling: Notify::new(),
            learned,
            used: AtomicBool::new(true),
        }
    }

    pub(super) fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Nobody waits for the connection from now on (its limit announced, its settle window passed, or
    /// its end); whoever waited chooses again.
    pub(super) fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.settling.notify_waiters();
        }
    }

    /// h2 reports the server's limit from now on; the connection settles.
    pub(super) fn announce(&self) {
        self.announced.store(true, Ordering::Release);
        self.settle();
    }

    /// Announced once h2 reports a limit other than the one it started with (the SETTINGS arrived);
    /// the pool learns it.
    pub(super) fn announce_if_changed(&self, current: usize) {
        if current != self.h2_initial {
            self.learned.store(current.max(1), Ordering::Relaxed);
            self.announce();
        }
    }

    pub(super) fn announced(&self) -> bool {
        self.announced.load(Ordering::Acquire)
    }

    /// Returns when the connection has settled.
    pub(super) async fn until_settled(&self) {
        let notified = self.settling.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.settled() {
            notified.await;
        }
    }

    /// Its sender once the handshake is done, or how it ended.
    pub(super) async fn ready(&self) -> Result<Sender, Handshake> {
        let mut state = self.state.clone();
        let outcome = match state.wait_for(|state| !matches!(state, Handshake::Connecting)).await {
            Ok(outcome) => outcome.clone(),
            // The connecting task ended without saying: it was cancelled (the runtime is stopping).
            Err(_) => Handshake::Failed("the connection attempt was cancelled".into()),
        };
        match outcome {
            Handshake::Ready(sender) => Ok(sender),
            ended => Err(ended),
        }
    }

    /// The stream limit to plan with, and whether it is the server's (to be learned by the pool).
    pub(super) fn limit(&self) -> (usize, bool) {
        let driver = self.driver.lock().unwrap_or_else(PoisonError::into_inner);
        effective_limit(driver.as_ref().map(Driver::current_max_send_streams), self.announced(), self.assumed_limit)
    }

    pub(super) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether no request may take it any more (ended, failed, or its task gone without saying).
    pub(super) fn closed(&self) -> bool {
        let abandoned = self.state.has_changed().is_err();
        match &*self.state.borrow() {
            Handshake::Connecting => abandoned,
            Handshake::Ready(sender) => abandoned || sender.is_closed(),
            Handshake::NotOffered | Handshake::Failed(_) | Handshake::Closed => true,
        }
    }

    /// Whether it is handshaken and not closed.
    pub(super) fn live(&self) -> bool {
        let ready = matches!(&*self.state.borrow(), Handshake::Ready(_));
        ready && !self.closed()
    }
}

/// The limit to plan with: what h2 reports once it reports the server's, `assumed` until then (and
/// before the handshake).
fn effective_limit(current: Option<usize>, announced: bool, assumed: usize) -> (usize, bool) {
    match current {
        Some(current) if announced => (current.max(1), true),
        _ => (assumed.max(1), false),
    }
}

/// Returns once the connection had no open stream and was not taken for a whole `idle` period; it is
/// then out of `pool` (under the pool's lock, so no request can take it in between).
pub(super) async fn until_idle<T>(
    pool: &Mutex<T>,
    connection: &Arc<H2Connection>,
    idle: Duration,
    forget: fn(&mut T, &Arc<H2Connection>),
) {
    loop {
        tokio::time::sleep(idle.max(MIN_IDLE_CHECK)).await;
        let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
        let used = connection.used.swap(false, Ordering::Relaxed);
        if !used && connection.open() == 0 {
            forget(&mut pool, connection);
            return;
        }
    }
}

/// A stream counted against its connection until dropped.
pub(super) struct StreamSlot {
    pub(super) connection: Arc<H2Connection>,
    /// How many streams were open on the connection when this one was taken.
    pub(super) position: usize,
}

impl StreamSlot {
    pub(super) fn take(connection: Arc<H2Connection>) -> Self {
        let position = connection.open.fetch_add(1, Ordering::Relaxed);
        connection.used.store(true, Ordering::Relaxed);
        Self { connection, position }
    }

    /// Whether the request must wait for the connection to settle before it is sent.
    pub(super) fn must_wait(&self) -> bool {
        self.position >= UNSETTLED_SENDS && !self.connection.settled()
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
    pub(super) fn new(incoming: Incoming, slot: Option<StreamSlot>) -> Self {
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
        (tell, Arc::new(H2Connection::new(state, assumed_limit, 1, false, Arc::default())))
    }

    #[test]
    fn a_slot_counts_a_stream_until_dropped() {
        let (_tell, held) = connection(2);
        let first = StreamSlot::take(Arc::clone(&held));
        let second = StreamSlot::take(Arc::clone(&held));
        assert_eq!((held.open(), held.limit()), (2, (2, false)), "two of two streams open");
        drop(first);
        assert_eq!(held.open(), 1);
        drop(second);
        assert_eq!(held.open(), 0);
    }

    #[test]
    fn the_servers_limit_counts_once_the_connection_has_settled() {
        assert_eq!(effective_limit(None, false, 100), (100, false), "not handshaken yet");
        assert_eq!(effective_limit(Some(1), false, 100), (100, false), "h2's start, before the SETTINGS");
        assert_eq!(effective_limit(Some(10), true, 100), (10, true));
        assert_eq!(effective_limit(Some(1), true, 100), (1, true), "a server that allows one stream");
        assert_eq!(effective_limit(Some(usize::MAX), true, 100), (usize::MAX, true), "SETTINGS without a limit");
        assert_eq!(effective_limit(Some(0), true, 0), (1, true), "a limit of zero still lets one through");
    }

    #[tokio::test]
    async fn requests_beyond_the_first_two_wait_until_the_connection_settles() {
        let (_tell, held) = connection(100);
        let slots: Vec<_> = (0..3).map(|_| StreamSlot::take(Arc::clone(&held))).collect();
        assert_eq!(slots.iter().map(StreamSlot::must_wait).collect::<Vec<_>>(), [false, false, true]);
        let waiting = tokio::spawn({
            let held = Arc::clone(&held);
            async move { held.until_settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        held.announce_if_changed(1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "h2's own start value is no announcement");
        held.announce_if_changed(10);
        waiting.await.unwrap();
        assert_eq!(held.learned.load(Ordering::Relaxed), 10, "the pool learns an announced limit at once");
        assert!(!slots[2].must_wait());
        held.until_settled().await;
        // Settled by the window alone: nobody waits, and the pool still plans with its assumption.
        let (_tell, late) = connection(100);
        late.settle();
        assert!(late.settled() && !late.announced());
        assert_eq!(late.limit(), (100, false));
    }

    #[test]
    fn a_connection_still_connecting_is_not_closed_and_one_that_failed_or_was_abandoned_is() {
        let (tell, held) = connection(1);
        assert!(!held.closed() && !held.live());
        tell.send_replace(Handshake::Failed("refused".into()));
        assert!(held.closed());
        let (tell, refused) = connection(1);
        tell.send_replace(Handshake::NotOffered);
        assert!(refused.closed());
        let (tell, abandoned) = connection(1);
        drop(tell);
        assert!(abandoned.closed(), "its connecting task was dropped without saying");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_leaves_the_pool_after_a_whole_idle_period_without_streams() {
        fn forget(pool: &mut Vec<Arc<H2Connection>>, gone: &Arc<H2Connection>) {
            pool.retain(|held| !Arc::ptr_eq(held, gone));
        }
        let idle = Duration::from_secs(90);
        let (_tell, held) = connection(2);
        let pool = Mutex::new(vec![Arc::clone(&held)]);
        let slot = StreamSlot::take(Arc::clone(&held));
        let busy = tokio::time::timeout(idle * 5, until_idle(&pool, &held, idle, forget)).await;
        assert!(busy.is_err(), "a connection with an open stream stays");
        drop(slot);
        let started = tokio::time::Instant::now();
        until_idle(&pool, &held, idle, forget).await;
        // Given back just now: a whole period without use after the one it was given back in.
        assert_eq!(started.elapsed(), idle * 2);
        assert!(pool.lock().unwrap().is_empty());
        // A zero idle timeout is checked every MIN_IDLE_CHECK, not in a busy loop.
        let started = tokio::time::Instant::now();
        until_idle(&pool, &held, Duration::ZERO, forget).await;
        assert_eq!(started.elapsed(), MIN_IDLE_CHECK);
    }
}
