//! The Redis backend: entries shared by every sluice pointing at the same Redis, each with its TTL set in
//! Redis. Built on the `redis` crate's tokio `ConnectionManager` (it reconnects by itself; one multiplexed
//! connection serves every request). Redis is a help, never a dependency: a read that fails or takes longer
//! than `READ_TIMEOUT` is a miss, a write is done in the background, and while Redis is down sluice keeps
//! answering from the upstream — each failure counted, logged at most once a minute, and followed by a
//! short pause in which Redis is not asked at all (so no request waits on a Redis that is down).

use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::entry::{Entry, MAX_ENTRY_BYTES};
use super::key::Key;
use crate::observe::CacheMetrics;

/// How long a lookup may take before it counts as a miss.
pub const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// How long a background write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between attempts to make the first connection.
const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Failures are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Writes waiting to go out at once; beyond, a write is skipped (the entry is only a saving).
const MAX_PENDING_WRITES: usize = 256;
/// After a failure, Redis is left alone this long: while it is down, requests do not each wait for it.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A Redis-backed store.
pub struct Remote {
    connection: Arc<RwLock<Option<ConnectionManager>>>,
    metrics: Arc<CacheMetrics>,
    complaints: Arc<Complaints>,
    writes: Arc<tokio::sync::Semaphore>,
}

impl Remote {
    /// Starts connecting to `url` in the background (needs a tokio runtime); until connected, every
    /// lookup is a miss.
    pub fn new(url: &str, metrics: Arc<CacheMetrics>) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let connection = Arc::new(RwLock::new(None));
        let complaints = Arc::new(Complaints::default());
        tokio::spawn(connect(client, Arc::downgrade(&connection), complaints.clone(), metrics.clone()));
        let writes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_WRITES));
        Ok(Self { connection, metrics, complaints, writes })
    }

    /// Whether the first connection has been made (the manager reconnects by itself after that).
    pub fn connected(&self) -> bool {
        self.connection.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.connection.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The entry under `key`, or None — on a miss, and on any failure or a slow answer.
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        if self.complaints.paused() {
            return None;
        }
        let mut connection = self.connection()?;
        // GETRANGE, not GET: whatever another writer put under the key, no more than an entry is read.
        let mut command = redis::cmd("GETRANGE");
        command.arg(redis_key(key)).arg(0).arg(MAX_ENTRY_BYTES + 128 * 1024);
        let read = command.query_async::<Option<Vec<u8>>>(&mut connection);
        match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(bytes)) => bytes.and_then(|b| Entry::decode(&b)).map(Arc::new),
            Ok(Err(err)) => {
                self.failed(format_args!("a cache read failed: {err}"));
                None
            }
            Err(_) => {
                self.failed(format_args!("a cache read took longer than {}ms", READ_TIMEOUT.as_millis()));
                None
            }
        }
    }

    /// Stores `entry` under `key` for `ttl`, in the background.
    pub fn put(&self, key: Key, entry: &Entry, ttl: Duration) {
        if self.complaints.paused() {
            return;
        }
        let Some(mut connection) = self.connection() else { return };
        let Ok(slot) = self.writes.clone().try_acquire_owned() else { return };
        let bytes = entry.encode();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let (metrics, complaints) = (self.metrics.clone(), self.complaints.clone());
        tokio::spawn(async move {
            let size = bytes.len();
            let mut write = redis::cmd("SET");
            write.arg(redis_key(&key)).arg(bytes).arg("PX").arg(millis);
            let written = tokio::time::timeout(WRITE_TIMEOUT, write.query_async::<()>(&mut connection)).await;
            drop(slot);
            match written {
                Ok(Ok(())) => metrics.written(size),
                Ok(Err(err)) => complaints.failed(&metrics, format_args!("a cache write failed: {err}")),
                Err(_) => complaints.failed(&metrics, format_args!("a cache write timed out")),
            }
        });
    }

    fn failed(&self, what: std::fmt::Arguments<'_>) {
        self.complaints.failed(&self.metrics, what);
    }
}

/// The Redis key of an entry.
fn redis_key(key: &Key) -> String {
    format!("sluice:cache:v1:{}", key.hex())
}

/// Makes the first connection, retrying until it succeeds or the store is dropped. (Once made, the
/// connection manager reconnects by itself.)
async fn connect(
    client: redis::Client,
    slot: Weak<RwLock<Option<ConnectionManager>>>,
    complaints: Arc<Complaints>,
    metrics: Arc<CacheMetrics>,
) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(1))
        .set_response_timeout(Duration::from_secs(1))
        .set_number_of_retries(1)
        .set_max_delay(1000);
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(manager) => {
                let Some(slot) = slot.upgrade() else { return };
                *slot.write().unwrap_or_else(PoisonError::into_inner) = Some(manager);
                tracing::info!("the cache is connected to Redis");
                return;
            }
            Err(err) => complaints.failed(&metrics, format_args!("cannot connect to the cache's Redis: {err}")),
        }
        tokio::time::sleep(CONNECT_RETRY).await;
        if slot.strong_count() == 0 {
            return;
        }
    }
}

/// Counts every failure, logs one a minute at most, and pauses the use of Redis briefly after each.
#[derive(Default)]
struct Complaints {
    last_logged: Mutex<Option<Instant>>,
    paused_until: Mutex<Option<Instant>>,
}

impl Complaints {
    fn paused(&self) -> bool {
        self.paused_until.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, metrics: &CacheMetrics, what: std::fmt::Arguments<'_>) {
        metrics.backend_error();
        *self.paused_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + PAUSE_AFTER_FAILURE);
        let mut last = self.last_logged.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!("{what}; serving from the upstream (logged at most once a minute)");
        }
    }
}
