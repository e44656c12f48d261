//! Accounts for the mock upstream: each with its keys, its own hidden concurrency cap, a balance that a
//! test can flip, and keys it can revoke — like DeepSeek, which limits per account whatever the key.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sluice::config::{AccountConfig, ApiKey, Config};

use super::{config_for, Mock};

/// One account the mock knows.
pub struct MockAccount {
    pub name: String,
    keys: Vec<String>,
    cap: Option<usize>,
    revoked: Mutex<HashSet<String>>,
    available: AtomicBool,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    /// Requests the account served or throttled (not refused).
    arrivals: AtomicUsize,
}

impl MockAccount {
    pub fn new(name: &str, keys: &[&str], cap: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            cap,
            revoked: Mutex::default(),
            available: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            arrivals: AtomicUsize::new(0),
        })
    }

    /// The upstream answers 401 to this key from now on.
    pub fn revoke(&self, key: &str) {
        self.revoked.lock().unwrap().insert(key.to_string());
    }

    /// The balance runs out (402) or comes back.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }

    pub fn arrivals(&self) -> usize {
        self.arrivals.load(Ordering::SeqCst)
    }

    pub fn available(&self) -> bool {
        self.available.load(Ordering::SeqCst)
    }

    /// Takes one of the account's slots, unless its hidden cap is reached.
    pub fn reserve(self: &Arc<Self>) -> Option<AccountSlot> {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
        let cap = self.cap.unwrap_or(usize::MAX);
        let now = self.inflight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1));
        let now = now.ok()? + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        Some(AccountSlot(self.clone()))
    }
}

/// A slot of an account, given back when dropped (with the response body).
pub struct AccountSlot(Arc<MockAccount>);

impl Drop for AccountSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the mock makes of a request's `Authorization`.
pub enum Caller {
    /// A key of this account, not revoked.
    Account(Arc<MockAccount>),
    /// No known key, or a revoked one.
    Refused,
}

/// The accounts of a mock.
pub struct MockAccounts(pub Vec<Arc<MockAccount>>);

impl MockAccounts {
    pub fn caller(&self, authorization: Option<&str>) -> Caller {
        let key = authorization.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        match self.0.iter().find(|a| a.keys.iter().any(|k| k == key)) {
            Some(account) if !account.revoked.lock().unwrap().contains(key) => Caller::Account(account.clone()),
            _ => Caller::Refused,
        }
    }
}

/// DeepSeek's answer to `GET /user/balance`.
pub fn balance_body(account: &MockAccount) -> String {
    let total = if account.available() { "42.50" } else { "0.00" };
    serde_json::json!({
        "is_available": account.available(),
        "balance_infos": [{"currency": "CNY", "total_balance": total, "granted_balance": "0.00", "topped_up_balance": total}]
    })
    .to_string()
}

/// sluice in front of `mock` with `accounts` (name, keys).
pub fn with_accounts(mock: &Mock, accounts: &[(&str, &[&str])]) -> Config {
    let mut config = config_for(mock);
    config.upstream.api_key = None;
    config.upstream.accounts = accounts
        .iter()
        .map(|(name, keys)| AccountConfig {
            name: name.to_string(),
            api_key_file: None,
            api_keys_file: None,
            api_key_env: None,
            weight: 1,
            models: Default::default(),
            keys: keys.iter().map(|k| ApiKey::new(k, "test").unwrap()).collect(),
        })
        .collect();
    config
}
