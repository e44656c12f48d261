//! The upstreams a request may go to — the primary, then each `[[fallbacks]]` entry in order — as
//! targets: a client for the base URL, the account whose lane serves it, and the model to ask for. The
//! retry loop (`attempts.rs`) moves a request to the next target when the primary cannot answer it:
//! - it has waited and retried `fallback.after` while its lane was throttled;
//! - `PERSISTENT` attempts in a row failed (5xx, a failed connection);
//! - the primary stayed silent for `upstream.header_timeout` (with `fallback.on_header_timeout`);
//! - a stream showed no content within `fallback.first_token_timeout`;
//! - the upstream could not be reached for `upstream.unreachable_wait`;
//! - and from the start while the primary's circuit is open (`circuit.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Config, UpstreamConfig};
use crate::upstream::accounts::Accounts;
use crate::upstream::{BuildError, Upstream};

/// Attempts in a row that failed (5xx, no connection) before a request moves on.
pub const PERSISTENT: u32 = 3;

/// The name of the primary in `x-sluice-upstream` and the log.
pub const PRIMARY: &str = "primary";

/// Whether a request path is one that falls back (chat and text completions).
pub fn completions(path: &str) -> bool {
    path.split('?').next().unwrap_or("").ends_with("/completions")
}

/// One upstream a request may be sent to.
pub struct Target {
    pub name: Arc<str>,
    pub upstream: Upstream,
    /// The account whose lane serves it (None: the primary's accounts).
    pub pool: Option<Arc<str>>,
    models: BTreeMap<String, String>,
}

impl Target {
    /// The model to ask this target for, for a request that named `model` (None: as it is).
    pub fn model_for(&self, model: &str) -> Option<&str> {
        self.models.get(model).or_else(|| self.models.get("*")).map(String::as_str).filter(|m| *m != model)
    }
}

/// The primary (first) and the fallbacks of `config`; a fallback on another base URL gets a client of
/// its own.
pub fn targets(config: &Config, primary: &Upstream, accounts: &Accounts) -> Result<Vec<Target>, BuildError> {
    let mut targets =
        vec![Target { name: Arc::from(PRIMARY), upstream: primary.clone(), pool: None, models: BTreeMap::new() }];
    for fallback in &config.fallbacks {
        let upstream = match &fallback.base_url {
            Some(url) if *url != config.upstream.base_url => {
                Upstream::new(&UpstreamConfig { base_url: url.clone(), ..config.upstream.clone() })?
            }
            _ => primary.clone(),
        };
        let account = match (&fallback.account, fallback.own_key()) {
            (Some(account), _) => account.clone(),
            (None, true) => fallback.name.clone(),
            (None, false) => accounts.first().to_string(),
        };
        targets.push(Target {
            name: Arc::from(fallback.name.as_str()),
            upstream,
            pool: Some(Arc::from(account)),
            models: fallback.models.clone(),
        });
    }
    Ok(targets)
}
