//! Who is calling. A request whose `Authorization: Bearer <token>` hashes to a configured client's
//! `token_sha256` *is* that client (compared in constant time, against every client): its fairness group,
//! its priority ceiling, its quotas and its metrics label; its `x-sluice-client` is ignored. Anyone else is
//! `anonymous` — refused when `server.require_client_token` is on.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::admission::{ClientId, ClientLimits, Priority};
use crate::config::{Config, PriorityName};

/// A configured client, as the request path needs it.
#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    /// Its fairness group (stable for the process, whatever the request says).
    pub id: ClientId,
    pub max_priority: Priority,
    pub daily_tokens: Option<u64>,
    hash: [u8; 32],
}

/// The configured clients of one config generation.
#[derive(Debug, Default)]
pub struct Clients {
    known: Vec<Arc<Client>>,
    /// Every proxied request needs a known token.
    pub required: bool,
    limits: Vec<(ClientId, ClientLimits)>,
}

impl Clients {
    pub fn new(config: &Config, hasher: &RandomState) -> Self {
        let mut known = Vec::new();
        let mut limits = Vec::new();
        for client in &config.clients {
            let Some(hash) = client.token_hash() else { continue }; // validation made sure there is one
            let name: Arc<str> = Arc::from(client.name.as_str());
            let id = hasher.hash_one((3u8, client.name.as_str()));
            let max_priority = match client.max_priority {
                PriorityName::High => Priority::High,
                PriorityName::Normal => Priority::Normal,
                PriorityName::Low => Priority::Low,
            };
            known.push(Arc::new(Client {
                name: name.clone(),
                id,
                max_priority,
                daily_tokens: client.daily_tokens,
                hash,
            }));
            let rate = client.rate.map(|rate| (rate.interval(), (rate.per_second().floor() as u32).max(1)));
            // A client that waits for its slots or its rate must not fill the whole queue meanwhile: unless
            // told otherwise, it may hold half of it.
            let held = client.max_concurrency.is_some() || client.rate.is_some();
            let max_queued = client.max_queued.or(held.then_some((config.queue.max_depth / 2).max(1)));
            let max_concurrency = client.max_concurrency.map(|n| n as usize);
            limits.push((id, ClientLimits { name, max_concurrency, rate, max_queued }));
        }
        Self { known, required: config.server.require_client_token, limits }
    }

    /// The quotas admission enforces.
    pub fn limits(&self) -> Vec<(ClientId, ClientLimits)> {
        self.limits.clone()
    }

    /// Names of every configured client.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.known.iter().map(|c| &c.name)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Client>> {
        self.known.iter().find(|c| &*c.name == name)
    }

    /// The configured client whose token the request carries, if any.
    pub fn identify(&self, headers: &HeaderMap) -> Option<Arc<Client>> {
        if self.known.is_empty() {
            return None;
        }
        let value = headers.get(header::AUTHORIZATION)?.as_bytes();
        let token = value.get(..7).filter(|p| p.eq_ignore_ascii_case(b"bearer ")).and(value.get(7..))?;
        let hash: [u8; 32] = Sha256::digest(token.trim_ascii()).into();
        let mut found = None;
        for client in &self.known {
            // No early exit: the time taken does not depend on which client (if any) matched.
            if constant_time_eq(&client.hash, &hash) {
                found = Some(client.clone());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{token_sha256, ClientConfig};
    use http::HeaderValue;

    fn config() -> Config {
        let mut config = Config::default();
        config.clients.push(ClientConfig {
            name: "batch".into(),
            token_sha256: Some(token_sha256("tok-batch")),
            token_file: None,
            max_priority: PriorityName::Low,
            max_concurrency: Some(2),
            rate: Some("120/min".parse().unwrap()),
            max_queued: None,
            daily_tokens: Some(1000),
        });
        config
    }

    fn bearer(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn a_token_is_its_client_and_nothing_else_is() {
        let clients = Clients::new(&config(), &RandomState::new());
        let batch = clients.identify(&bearer("Bearer tok-batch")).unwrap();
        assert_eq!((&*batch.name, batch.max_priority, batch.daily_tokens), ("batch", Priority::Low, Some(1000)));
        assert!(clients.identify(&bearer("bearer  tok-batch ")).is_some(), "scheme case and spaces");
        assert!(clients.identify(&bearer("Bearer tok-other")).is_none());
        assert!(clients.identify(&bearer("tok-batch")).is_none(), "no scheme");
        assert!(clients.identify(&HeaderMap::new()).is_none());
        let (id, limits) = &clients.limits()[0];
        assert_eq!(*id, batch.id);
        assert_eq!((limits.max_concurrency, limits.rate.map(|r| r.1)), (Some(2), Some(2)));
    }
}
