//! The response cache and request coalescing: a stage in front of admission, so that no one pays twice for
//! the same answer. An eligible request (`key.rs`) is answered from the store when it can be (a hit skips
//! admission and the upstream); otherwise it joins the identical call in flight (`coalesce.rs`) or starts
//! one, whose complete, successful answer is stored (`entry.rs`) in memory (`memory.rs`) or in Redis
//! (`remote.rs`) for `cache.ttl`.

pub mod coalesce;
mod entry;
pub mod key;
mod memory;
mod remote;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};

pub use coalesce::{Call, Coalescer, Ending, Joined, Member};
pub use entry::{Entry, Form};
pub use key::{Ask, Key};

use crate::config::{CacheBackend, CacheConfig};
use crate::observe::CacheMetrics;
use crate::proxy::ResponseBody;

/// Request header: `use`, `skip` or `refresh`. Response header: what the cache did (`CACHE_RESULTS`).
pub const CACHE_HEADER: &str = "x-sluice-cache";

/// Where entries live.
pub enum Store {
    Memory(memory::Memory),
    Redis(remote::Remote),
}

impl Store {
    /// The store `config` asks for (None when the cache is off). A Redis URL the client rejects leaves
    /// the cache off, said once (validation has already checked its form).
    pub fn new(config: &CacheConfig, metrics: &Arc<CacheMetrics>) -> Option<Arc<Self>> {
        if !config.enabled {
            return None;
        }
        let store = match (config.backend, config.redis_url.as_deref()) {
            (CacheBackend::Redis, Some(url)) => match remote::Remote::new(url, metrics.clone()) {
                Ok(remote) => Self::Redis(remote),
                Err(err) => {
                    tracing::error!("cache.redis_url cannot be used ({err}); the cache is off");
                    return None;
                }
            },
            _ => Self::Memory(memory::Memory::new(config.max_bytes.0, metrics.clone())),
        };
        Some(Arc::new(store))
    }

    /// Whether the store built for `old` serves `new` too (a reload keeps it, and its entries).
    pub fn serves(old: &CacheConfig, new: &CacheConfig) -> bool {
        (old.enabled, old.backend, &old.redis_url, old.max_bytes)
            == (new.enabled, new.backend, &new.redis_url, new.max_bytes)
    }

    /// Whether the backend can be used: always for memory; for Redis, once first connected.
    pub fn connected(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(remote) => remote.connected(),
        }
    }

    /// The fresh entry under `key`, if any. Never fails: a backend in trouble is a miss.
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        match self {
            Self::Memory(memory) => memory.get(key),
            Self::Redis(remote) => remote.get(key).await,
        }
    }

    /// Stores `entry` for `ttl` (Redis: in the background).
    pub fn put(&self, key: Key, entry: Arc<Entry>, ttl: Duration) {
        match self {
            Self::Memory(memory) => memory.put(key, entry, ttl),
            Self::Redis(remote) => remote.put(key, &entry, ttl),
        }
    }
}

/// What the cache stage makes of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Not eligible: it goes its own way (`x-sluice-cache: bypass`).
    Bypass,
    /// Eligible under `key`.
    Eligible { key: Key, ask: Ask },
}

/// The plan for a request, when the cache is on. The key's scope is the upstream (and, when clients
/// bring their own key, that key's hash: an answer paid for with one key is not served to another).
pub fn plan(
    config: &CacheConfig,
    upstream: &str,
    keyed: bool,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Plan {
    let ask = Ask::from_header(headers.get(CACHE_HEADER).map(HeaderValue::as_bytes));
    let mut scope = Sha256::new();
    scope.update(upstream.as_bytes());
    if !keyed {
        scope.update(headers.get(header::AUTHORIZATION).map_or(&b""[..], HeaderValue::as_bytes));
    }
    let scope: [u8; 32] = scope.finalize().into();
    match key::key_of(&scope, method, path_and_query, body, config.deterministic_only, ask) {
        Some(key) => Plan::Eligible { key, ask },
        None => Plan::Bypass,
    }
}

/// The response to a hit: the stored answer, at once.
pub fn hit_response(entry: &Entry) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(entry.body.clone()));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_maybe_shared(entry.content_type.clone())
        .unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    if entry.form == Form::Events {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    headers.insert(header::AGE, HeaderValue::from(unix_now().saturating_sub(entry.stored_at)));
    headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    response
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The entry for a call's recorded body, when it is one worth keeping.
pub fn entry_of(content_type: Option<&HeaderValue>, body: &Bytes) -> Option<Entry> {
    Entry::from_response(content_type?.as_bytes(), body, unix_now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_clients_do_not_share_answers() {
        let config = CacheConfig { enabled: true, ..CacheConfig::default() };
        let body = br#"{"model":"m","temperature":0}"#;
        let plan_with = |keyed: bool, token: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(token));
            plan(&config, "https://api.deepseek.com", keyed, &Method::POST, "/chat/completions", &headers, body)
        };
        assert_ne!(plan_with(false, "Bearer a"), plan_with(false, "Bearer b"), "each brings its own key");
        assert_eq!(plan_with(true, "Bearer a"), plan_with(true, "Bearer b"), "sluice holds the key");
        let elsewhere =
            plan(&config, "http://127.0.0.1:9", true, &Method::POST, "/chat/completions", &HeaderMap::new(), body);
        assert_ne!(plan_with(true, "Bearer a"), elsewhere, "another upstream");
        let mut skip = HeaderMap::new();
        skip.insert(CACHE_HEADER, HeaderValue::from_static("skip"));
        assert_eq!(plan(&config, "u", true, &Method::POST, "/chat/completions", &skip, body), Plan::Bypass);
    }
}
