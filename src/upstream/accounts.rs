//! The accounts sluice sends requests on and the health of their keys: which key a request of an account
//! uses (round-robin over the keys still enabled), a key the upstream refused (401) set aside, an
//! account out of balance (402) paused until its balance says it is available, the upstream's own answer
//! kept for when no account can serve, and the latest balance read. Names are labels; keys never leave
//! this module except as a ready `Authorization` value (and, for a cluster, as a fingerprint: the first
//! 16 hex digits of its SHA-256, which names a key without revealing it).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::admission::{AccountLimits, DEFAULT_ACCOUNT};
use crate::config::{ApiKey, FallbackConfig, UpstreamConfig};

/// The upstream's own refusal (a 401 or 402 response), kept to answer with when no account can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// One balance entry of `GET /user/balance`.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceInfo {
    pub currency: String,
    pub total: f64,
}

/// What the latest balance read said.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Balance {
    pub available: bool,
    pub infos: Vec<BalanceInfo>,
}

/// The accounts in force: built from the config (and rebuilt by a reload, keys starting healthy).
#[derive(Debug)]
pub struct Accounts {
    accounts: Vec<Account>,
}

#[derive(Debug)]
struct Account {
    name: Arc<str>,
    weight: u32,
    caps: Vec<(String, usize)>,
    keys: Vec<Key>,
    next: AtomicUsize,
    /// Out of balance (402) until a balance read says otherwise.
    paused: AtomicBool,
    refusal: Mutex<Option<Refusal>>,
    balance: Mutex<Option<Balance>>,
    /// A fallback's own account (another upstream, its own key).
    fallback_only: bool,
    /// Paused because another instance of the cluster found it out of balance.
    paused_by_cluster: AtomicBool,
    /// A balance read ended a pause here (the cluster is told, then this is cleared).
    resumed: AtomicBool,
}

#[derive(Debug)]
struct Key {
    authorization: HeaderValue,
    fingerprint: String,
    disabled: AtomicBool,
    /// Set aside because another instance of the cluster saw it refused (lifted when the cluster forgets).
    refused_by_cluster: AtomicBool,
}

/// How an account stands, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountView {
    pub name: String,
    pub keys: usize,
    pub keys_disabled: usize,
    pub paused: bool,
    /// Serving: not paused, a key left (or no key at all: the client's own is passed through).
    pub available: bool,
    pub balance: Option<Balance>,
}

/// What the upstream's refusal did to an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setback {
    /// A key was set aside; the account has others.
    KeyDisabled,
    /// The account serves no more (its last key went, or its balance ran out).
    AccountOut,
}

impl Accounts {
    /// The accounts of `config`: `[[upstream.accounts]]`, else one account `default` with the single key
    /// (or none: then each client's own key is passed through).
    pub fn new(config: &UpstreamConfig) -> Self {
        let accounts = if config.accounts.is_empty() {
            vec![Account::new(DEFAULT_ACCOUNT, 1, Vec::new(), config.api_key.iter())]
        } else {
            config
                .accounts
                .iter()
                .map(|a| {
                    let caps = a.models.iter().map(|(m, l)| (m.clone(), l.max_concurrency as usize)).collect();
                    Account::new(&a.name, a.weight, caps, a.keys.iter())
                })
                .collect()
        };
        Self { accounts }
    }

    /// Adds each fallback that brings its own key as an account of its own (named after it).
    pub fn with_fallbacks(mut self, fallbacks: &[FallbackConfig]) -> Self {
        for fallback in fallbacks.iter().filter(|f| f.own_key()) {
            let mut account = Account::new(&fallback.name, 1, Vec::new(), fallback.key.iter());
            account.fallback_only = true;
            self.accounts.push(account);
        }
        self
    }

    fn get(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| &*a.name == name)
    }

    /// What admission needs to know: names, weights, caps.
    pub fn limits(&self) -> Vec<AccountLimits> {
        self.accounts
            .iter()
            .map(|a| AccountLimits {
                name: a.name.clone(),
                weight: a.weight,
                caps: a.caps.iter().cloned().collect(),
                fallback_only: a.fallback_only,
            })
            .collect()
    }

    /// The primary's account names (bounded metric labels; the balance watch).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.accounts.iter().filter(|a| !a.fallback_only).map(|a| &*a.name)
    }

    /// The primary's first account (a fallback without an account or key of its own uses it).
    pub fn first(&self) -> &str {
        self.names().next().unwrap_or(DEFAULT_ACCOUNT)
    }

    /// Whether sluice holds keys for the primary (else clients' own keys pass through).
    pub fn keyed(&self) -> bool {
        self.accounts.iter().any(|a| !a.fallback_only && !a.keys.is_empty())
    }

    /// Whether `account` has keys of its own (then running out of them stops it; else the client's own
    /// key passes through).
    pub fn keyed_account(&self, account: &str) -> bool {
        self.get(account).is_some_and(|a| !a.keys.is_empty())
    }

    /// The key for the next attempt on `account`: (its index, its header value), round-robin over the
    /// enabled keys. None when the account has no key (pass-through) or none left.
    pub fn key(&self, account: &str) -> Option<(usize, HeaderValue)> {
        let account = self.get(account)?;
        let n = account.keys.len();
        let start = account.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| (start + i) % n).find_map(|i| {
            let key = &account.keys[i];
            (!key.disabled.load(Ordering::Relaxed)).then(|| (i, key.authorization.clone()))
        })
    }

    /// The upstream refused a key of `account` (401): set it aside. Returns whether the account still serves.
    pub fn key_refused(&self, account: &str, key: usize, refusal: Refusal) -> Setback {
        let Some(entry) = self.get(account) else { return Setback::AccountOut };
        entry.remember(refusal);
        if let Some(k) = entry.keys.get(key) {
            if !k.disabled.swap(true, Ordering::Relaxed) {
                tracing::error!(account, key = key + 1, "the upstream refused a key (401): it is set aside");
            }
        }
        if entry.available() {
            Setback::KeyDisabled
        } else {
            Setback::AccountOut
        }
    }

    /// The upstream said `account` is out of balance (402): pause it until its balance recovers.
    pub fn out_of_balance(&self, account: &str, refusal: Refusal) {
        if let Some(entry) = self.get(account) {
            entry.remember(refusal);
            if !entry.paused.swap(true, Ordering::Relaxed) {
                tracing::error!(account, "the upstream says the account is out of balance (402): it is paused");
            }
        }
    }

    /// A balance read of `account`. Returns true when it ended a pause (the account serves again).
    pub fn balance_read(&self, account: &str, balance: Balance) -> bool {
        let Some(entry) = self.get(account) else { return false };
        let available = balance.available;
        *entry.balance.lock().unwrap_or_else(PoisonError::into_inner) = Some(balance);
        let resumed = available && entry.paused.swap(false, Ordering::Relaxed);
        if resumed {
            entry.paused_by_cluster.store(false, Ordering::Relaxed);
            entry.resumed.store(true, Ordering::Relaxed);
            tracing::info!(account, "the account's balance is available again: it serves again");
        }
        resumed && entry.available()
    }

    /// Whether `account` serves.
    pub fn available(&self, account: &str) -> bool {
        self.get(account).is_some_and(Account::available)
    }

    /// The upstream's latest refusal on any account, to answer with when none can serve.
    pub fn refusal(&self) -> Option<Refusal> {
        self.accounts.iter().find_map(|a| a.refusal.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Fingerprints of the keys this instance saw refused (not those set aside on the cluster's word).
    pub fn refused_fingerprints(&self) -> Vec<String> {
        let keys = self.accounts.iter().flat_map(|a| &a.keys);
        keys.filter(|k| k.disabled.load(Ordering::Relaxed) && !k.refused_by_cluster.load(Ordering::Relaxed))
            .map(|k| k.fingerprint.clone())
            .collect()
    }

    /// Follows the cluster's refused keys: sets aside those in `refused`, takes back those set aside only
    /// on the cluster's word that are no longer. Returns the accounts whose serving changed, and how.
    pub fn follow_refusals(&self, refused: &HashSet<String>) -> Vec<(String, bool)> {
        self.serving_changes(|account| {
            for key in &account.keys {
                match follow_word(&key.disabled, &key.refused_by_cluster, refused.contains(&key.fingerprint)) {
                    Some(true) => tracing::warn!(account = %account.name, "another instance saw a key of this account refused (401): it is set aside here too"),
                    Some(false) => tracing::info!(account = %account.name, "the cluster no longer holds a key of this account refused: it is used again"),
                    None => {}
                }
            }
        })
    }

    /// Accounts paused here for their balance (402) — not those paused on the cluster's word — and those a
    /// balance read resumed and the cluster was not told of yet (`told_resumed`).
    pub fn own_pauses(&self) -> (Vec<String>, Vec<String>) {
        let paused = self
            .accounts
            .iter()
            .filter(|a| a.paused.load(Ordering::Relaxed) && !a.paused_by_cluster.load(Ordering::Relaxed));
        let resumed = self.accounts.iter().filter(|a| a.resumed.load(Ordering::Relaxed));
        (paused.map(|a| a.name.to_string()).collect(), resumed.map(|a| a.name.to_string()).collect())
    }

    /// The cluster was told that `accounts` resumed.
    pub fn told_resumed(&self, accounts: &[String]) {
        for account in self.accounts.iter().filter(|a| accounts.iter().any(|n| **n == *a.name)) {
            account.resumed.store(false, Ordering::Relaxed);
        }
    }

    /// Follows the cluster's paused accounts: pauses those in `paused`, resumes those paused only on the
    /// cluster's word that are no longer. Returns the accounts whose serving changed, and how.
    pub fn follow_pauses(&self, paused: &HashSet<String>) -> Vec<(String, bool)> {
        self.serving_changes(|account| {
            match follow_word(&account.paused, &account.paused_by_cluster, paused.contains(&*account.name)) {
                Some(true) => tracing::warn!(account = %account.name, "another instance found the account out of balance (402): it is paused here too"),
                Some(false) => tracing::info!(account = %account.name, "the cluster says the account's balance is available again"),
                None => {}
            }
        })
    }

    /// Applies `follow` to every account; returns those whose serving it changed, and how.
    fn serving_changes(&self, mut follow: impl FnMut(&Account)) -> Vec<(String, bool)> {
        let mut changed = Vec::new();
        for account in &self.accounts {
            let before = account.available();
            follow(account);
            if account.available() != before {
                changed.push((account.name.to_string(), !before));
            }
        }
        changed
    }

    pub fn views(&self) -> Vec<AccountView> {
        self.accounts
            .iter()
            .map(|a| AccountView {
                name: a.name.to_string(),
                keys: a.keys.len(),
                keys_disabled: a.keys.iter().filter(|k| k.disabled.load(Ordering::Relaxed)).count(),
                paused: a.paused.load(Ordering::Relaxed),
                available: a.available(),
                balance: a.balance.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            })
            .collect()
    }
}

impl Account {
    fn new<'a>(name: &str, weight: u32, caps: Vec<(String, usize)>, keys: impl Iterator<Item = &'a ApiKey>) -> Self {
        Self {
            name: Arc::from(name),
            weight,
            caps,
            keys: keys
                .map(|k| Key {
                    authorization: k.authorization().clone(),
                    fingerprint: fingerprint(k.authorization()),
                    disabled: AtomicBool::new(false),
                    refused_by_cluster: AtomicBool::new(false),
                })
                .collect(),
            next: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            refusal: Mutex::new(None),
            balance: Mutex::new(None),
            fallback_only: false,
            paused_by_cluster: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
        }
    }

    fn available(&self) -> bool {
        let keyless = self.keys.is_empty();
        !self.paused.load(Ordering::Relaxed)
            && (keyless || self.keys.iter().any(|k| !k.disabled.load(Ordering::Relaxed)))
    }

    fn remember(&self, refusal: Refusal) {
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(refusal);
    }
}

/// Follows the cluster's word on a setback (a refused key, a paused account): `held` by the cluster,
/// it is set here too (marked `by_cluster`); no longer held, it is lifted only if it was set on the
/// cluster's word. Returns Some(true) when it was set now, Some(false) when lifted now.
fn follow_word(setback: &AtomicBool, by_cluster: &AtomicBool, held: bool) -> Option<bool> {
    if held {
        let newly = !setback.swap(true, Ordering::Relaxed);
        if newly {
            by_cluster.store(true, Ordering::Relaxed);
        }
        newly.then_some(true)
    } else if by_cluster.swap(false, Ordering::Relaxed) {
        setback.store(false, Ordering::Relaxed);
        Some(false)
    } else {
        None
    }
}

/// Names a key without revealing it: the first 16 hex digits of its `Authorization` value's SHA-256.
fn fingerprint(authorization: &HeaderValue) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(authorization.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountConfig;

    fn accounts(keys: &[(&str, &[&str])]) -> Accounts {
        let config = UpstreamConfig {
            accounts: keys
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
                .collect(),
            ..UpstreamConfig::default()
        };
        Accounts::new(&config)
    }

    fn refusal(status: u16) -> Refusal {
        Refusal { status: StatusCode::from_u16(status).unwrap(), content_type: None, body: Bytes::from_static(b"{}") }
    }

    #[test]
    fn keys_rotate_and_a_refused_one_is_set_aside() {
        let accounts = accounts(&[("a", &["k1", "k2"])]);
        let first = accounts.key("a").unwrap();
        let second = accounts.key("a").unwrap();
        assert_ne!(first.0, second.0, "round-robin");
        assert_eq!(accounts.key_refused("a", first.0, refusal(401)), Setback::KeyDisabled);
        for _ in 0..4 {
            assert_eq!(accounts.key("a").unwrap().0, second.0, "only the good key is used");
        }
        assert_eq!(accounts.key_refused("a", second.0, refusal(401)), Setback::AccountOut);
        assert_eq!(accounts.key("a"), None);
        assert!(!accounts.available("a"));
        assert_eq!(accounts.refusal().unwrap().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn out_of_balance_pauses_until_the_balance_is_available() {
        let accounts = accounts(&[("a", &["k"]), ("b", &["k"])]);
        accounts.out_of_balance("a", refusal(402));
        assert!(!accounts.available("a") && accounts.available("b"));
        assert!(!accounts.balance_read("a", Balance { available: false, infos: vec![] }));
        assert!(accounts.balance_read("a", Balance { available: true, infos: vec![] }));
        assert!(accounts.available("a"));
    }

    #[test]
    fn what_a_cluster_shares_names_keys_by_fingerprint_and_follows_pauses() {
        let here = accounts(&[("a", &["k1", "k2"]), ("b", &["k3"])]);
        let there = accounts(&[("a", &["k1", "k2"]), ("b", &["k3"])]);
        let first = here.key("a").unwrap();
        here.key_refused("a", first.0, refusal(401));
        let refused: HashSet<String> = here.refused_fingerprints().into_iter().collect();
        assert_eq!(refused.len(), 1);
        assert!(refused.iter().all(|f| f.len() == 16 && !f.contains("k1")), "{refused:?}");
        assert!(there.follow_refusals(&refused).is_empty(), "a keeps another key: its serving did not change");
        assert_eq!(there.key("a").unwrap().0, 1 - first.0, "the same key is set aside there");
        assert!(there.refused_fingerprints().is_empty(), "there, it is the cluster's word, not its own");
        here.key_refused("b", 0, refusal(401));
        let both: HashSet<String> = here.refused_fingerprints().into_iter().collect();
        assert_eq!(there.follow_refusals(&both), vec![("b".to_string(), false)], "b serves no more");
        assert_eq!(there.follow_refusals(&refused), vec![("b".to_string(), true)], "the cluster forgot b's key");
        assert!(there.available("b"));

        here.out_of_balance("a", refusal(402));
        assert_eq!(here.own_pauses(), (vec!["a".to_string()], vec![]));
        let paused = HashSet::from(["a".to_string()]);
        assert_eq!(there.follow_pauses(&paused), vec![("a".to_string(), false)]);
        assert_eq!(there.own_pauses().0, Vec::<String>::new(), "paused on the cluster's word, not its own");
        assert!(there.follow_pauses(&paused).is_empty(), "no change");
        assert!(here.balance_read("a", Balance { available: true, infos: vec![] }));
        assert_eq!(here.own_pauses(), (vec![], vec!["a".to_string()]), "the resume is to be told");
        assert_eq!(here.own_pauses().1, vec!["a".to_string()], "until the cluster was told");
        here.told_resumed(&["a".to_string()]);
        assert_eq!(here.own_pauses().1, Vec::<String>::new());
        assert_eq!(there.follow_pauses(&HashSet::new()), vec![("a".to_string(), true)], "resumed there too");
    }

    #[test]
    fn a_single_key_is_the_default_account_and_none_means_pass_through() {
        let single = Accounts::new(&UpstreamConfig { api_key: ApiKey::new("sk", "t"), ..UpstreamConfig::default() });
        assert_eq!(single.names().collect::<Vec<_>>(), vec![DEFAULT_ACCOUNT]);
        assert!(single.keyed());
        let keyless = Accounts::new(&UpstreamConfig::default());
        assert!(!keyless.keyed());
        assert_eq!(keyless.key(DEFAULT_ACCOUNT), None);
        assert!(keyless.available(DEFAULT_ACCOUNT), "no key: clients' own keys pass through");
    }
}
