//! `[upstream]`: where requests go, how long sluice waits for it, and on which accounts and keys —
//! `[[upstream.accounts]]` (several DeepSeek accounts, each with one or more keys, a weight and per-model
//! caps) or the single key of `api_key_file` / `$CREDENTIALS_DIRECTORY` / `DEEPSEEK_API_KEY` (one
//! account named `default`) — and `[upstream.balance]`, the balance watch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ApiKey, ConfigError, ModelLimits};

/// `[upstream]`: where requests go, and how long sluice waits for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The only place requests are forwarded to: base_url + the request's path and query.
    pub base_url: String,
    /// A file holding the API key (systemd credentials, Docker secrets). Unset: `DEEPSEEK_API_KEY`.
    /// For several accounts use `[[upstream.accounts]]` instead.
    pub api_key_file: Option<PathBuf>,
    /// Time allowed to open a TCP connection (and finish TLS) to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request until the response headers arrive. Not retried when it passes.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest gap allowed between two chunks of a response body before the stream counts as dead.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long an unused pooled upstream connection is kept open.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// How long a request keeps retrying when the upstream cannot be reached at all (DNS, refused, TLS)
    /// before it gets 502 `sluice_upstream_unreachable`.
    #[serde(with = "humantime_serde")]
    pub unreachable_wait: Duration,
    /// Request paths forwarded upstream (prefixes). Anything else gets 404 `sluice_not_found` from sluice.
    pub paths: Vec<String>,
    /// Several DeepSeek accounts (each limited on its own), with their keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<AccountConfig>,
    /// The balance watch.
    pub balance: BalanceConfig,
    /// How connections to the upstream leave the host: `http://[user:pass@]host:port` (a CONNECT tunnel;
    /// TLS stays end to end) or `socks5://` / `socks5h://`; `"none"`: directly, whatever the environment
    /// says. Unset: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` from the environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyUrl>,
    /// Extra trusted roots (PEM): a company's TLS-inspecting proxy or a private upstream's CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Which roots are trusted besides `ca_file`: the bundled Mozilla set, the system's, or both.
    pub tls_roots: TlsRoots,
    /// The key in use, read from `api_key_file`, `$CREDENTIALS_DIRECTORY` or `DEEPSEEK_API_KEY`;
    /// never read from the config file and shown only redacted.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKey>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.deepseek.com".into(),
            api_key_file: None,
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            pool_idle_timeout: Duration::from_secs(90),
            unreachable_wait: Duration::from_secs(30),
            paths: ["/v1/", "/beta/", "/chat/", "/completions", "/models", "/user/balance", "/anthropic/"]
                .map(String::from)
                .to_vec(),
            accounts: Vec::new(),
            balance: BalanceConfig::default(),
            proxy: None,
            ca_file: None,
            tls_roots: TlsRoots::Bundled,
            api_key: None,
        }
    }
}

/// `upstream.tls_roots`: whose certificate authorities sluice trusts for the upstream. Verification is
/// never switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRoots {
    /// Mozilla's roots, built in (webpki-roots): the same everywhere, even in a scratch container.
    #[default]
    Bundled,
    /// The operating system's store (rustls-native-certs: /etc/ssl/certs and the like), read at start.
    System,
    Both,
}

/// `upstream.proxy`: a proxy URL, which may hold credentials — shown only without them.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct ProxyUrl(String);

impl ProxyUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL as configured, credentials included (for the connector only).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `"none"`: connect directly, ignoring the environment.
    pub fn is_none(&self) -> bool {
        self.0.trim().eq_ignore_ascii_case("none")
    }

    /// Checks the URL: a scheme sluice can use and a host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.is_none() {
            return Ok(());
        }
        let usable = self.0.parse::<http::Uri>().ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "socks5" | "socks5h")) && uri.host().is_some_and(|h| !h.is_empty())
        });
        match usable {
            Some(_) => Ok(()),
            None => Err(invalid(
                "upstream.proxy",
                without_credentials(&self.0),
                "\"none\", or a proxy URL such as \"http://proxy.corp:3128\", \"http://user:pass@proxy.corp:3128\" \
                 or \"socks5h://127.0.0.1:1080\"",
            )),
        }
    }
}

/// A URL with any `user:password@` replaced, for logs, errors and `/status`. Everything up to the last
/// `@` goes: a password may hold `/` or `@` itself.
pub fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) if at > scheme.len() => format!("{scheme}://[redacted]@{}", &url[at + 1..]),
        (None, Some(_)) => "[redacted]".to_string(),
        _ => url.to_string(),
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({})", without_credentials(&self.0))
    }
}

impl Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&without_credentials(&self.0))
    }
}

/// `[[upstream.accounts]]`: one DeepSeek account — what DeepSeek limits — and the keys sluice uses on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// The account's label in logs, metrics and `/status` (never the key): letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// A file holding the account's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// A file holding several keys of the account, one per line (blank lines and `#` comments ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<PathBuf>,
    /// An environment variable holding the account's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Share of traffic when several accounts have room for a request.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Caps of this account per model (over `[limits.models]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelLimits>,
    /// The keys, read at load time from the source above (or `$CREDENTIALS_DIRECTORY/<name>.key`); never
    /// from the config file, shown only redacted.
    #[serde(skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<ApiKey>,
}

fn default_weight() -> u32 {
    1
}

/// `[upstream.balance]`: each account's `GET /user/balance`, watched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// How often each account's balance is read ("0s": never). A paused account (402) is re-enabled
    /// when its balance says it is available again; a reload reads at once.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// Below this (in the account's currency) `sluice_account_balance_low` is 1 (alert `SluiceBalanceLow`).
    pub low: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { poll: Duration::from_secs(600), low: 5.0 }
    }
}

impl UpstreamConfig {
    /// Checks accounts: names unique and label-safe, one key source each, weights at least 1.
    pub(super) fn validate_accounts(&self) -> Result<(), ConfigError> {
        if !self.accounts.is_empty() && self.api_key_file.is_some() {
            return Err(invalid(
                "upstream.api_key_file",
                self.api_key_file.as_ref().map_or(String::new(), |p| p.display().to_string()),
                "unset when [[upstream.accounts]] are configured: give each account its key",
            ));
        }
        for (i, account) in self.accounts.iter().enumerate() {
            let key = |field: &str| format!("upstream.accounts[{i}] ({:?}).{field}", account.name);
            let label_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if account.name.is_empty() || account.name.len() > 64 || !account.name.chars().all(label_safe) {
                return Err(invalid(
                    key("name"),
                    format!("{:?}", account.name),
                    "1 to 64 letters, digits, '-', '_' or '.'",
                ));
            }
            if self.accounts[..i].iter().any(|other| other.name == account.name) {
                return Err(invalid(key("name"), format!("{:?}", account.name), "a name no other account has"));
            }
            let sources =
                [account.api_key_file.is_some(), account.api_keys_file.is_some(), account.api_key_env.is_some()];
            if sources.iter().filter(|s| **s).count() > 1 {
                return Err(invalid(
                    key("api_key_file"),
                    "several key sources",
                    "one of api_key_file, api_keys_file and api_key_env",
                ));
            }
            if account.weight == 0 {
                return Err(invalid(key("weight"), 0, "at least 1"));
            }
            for (model, limits) in &account.models {
                if limits.max_concurrency == 0 {
                    return Err(invalid(key(&format!("models.\"{model}\".max_concurrency")), 0, "at least 1"));
                }
            }
        }
        if !self.balance.low.is_finite() || self.balance.low < 0.0 {
            return Err(invalid("upstream.balance.low", self.balance.low, "a number of at least 0, such as 5"));
        }
        Ok(())
    }
}

/// A base URL as sluice uses it: no trailing slash, and no final `/v1` — the clients' paths carry that
/// (`OPENAI_BASE_URL=http://127.0.0.1:8787/v1` sends `/v1/chat/completions`), so `…/v1` would forward to
/// `/v1/v1/…`. Returns the URL and, when it changed, a note saying so.
pub fn normalise_base_url(key: &str, url: &str) -> (String, Option<String>) {
    let trimmed = url.trim().trim_end_matches('/');
    let bare = match trimmed.strip_suffix("/v1") {
        Some(origin) if origin.contains("://") && !origin.ends_with(':') && !origin.ends_with('/') => origin,
        _ => trimmed,
    };
    if bare == url {
        return (url.to_string(), None);
    }
    let why = if bare.len() < trimmed.len() {
        "clients' paths already carry /v1 (they send /v1/chat/completions), so a base URL ending in /v1 would \
         forward to /v1/v1/…"
    } else {
        "the trailing slash is dropped"
    };
    let note = format!("{key} {url:?} is used as {bare:?}: {why}; write it that way to silence this note");
    (bare.to_string(), Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_lose_a_final_v1_and_trailing_slashes() {
        let bare = |url: &str| normalise_base_url("upstream.base_url", url);
        assert_eq!(bare("https://api.deepseek.com"), ("https://api.deepseek.com".into(), None));
        for url in ["https://api.deepseek.com/", "https://api.deepseek.com/v1", "https://api.deepseek.com/v1/"] {
            let (used, note) = bare(url);
            assert_eq!(used, "https://api.deepseek.com", "{url}");
            assert!(note.is_some_and(|n| n.contains(url) && n.contains("\"https://api.deepseek.com\"")), "{url}");
        }
        assert!(bare("https://api.deepseek.com/v1").1.unwrap().contains("/v1/v1/"));
        assert_eq!(bare("https://gw.example/deepseek/").0, "https://gw.example/deepseek");
        assert_eq!(bare("https://gw.example/api/v1").0, "https://gw.example/api");
        assert_eq!(bare("https://gw.example/v10").0, "https://gw.example/v10");
    }

    #[test]
    fn proxy_urls_are_shown_without_credentials() {
        assert_eq!(without_credentials("http://u:p@proxy:3128"), "http://[redacted]@proxy:3128");
        assert_eq!(without_credentials("http://user:pa/ss@proxy:3128"), "http://[redacted]@proxy:3128");
        assert_eq!(without_credentials("http://u:p@ss@proxy:3128"), "http://[redacted]@proxy:3128");
        assert_eq!(without_credentials("socks5h://me@10.0.0.1:1080"), "socks5h://[redacted]@10.0.0.1:1080");
        assert!(ProxyUrl::new("ftp://x").validate().is_err());
        assert!(ProxyUrl::new("none").validate().is_ok());
        assert!(ProxyUrl::new("http://proxy.corp:3128").validate().is_ok());
    }
}
