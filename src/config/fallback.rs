//! `[[fallbacks]]` and `[fallback]`: where a request goes when the primary upstream cannot answer it —
//! other upstreams (or other models on the same one), tried in order — when it goes there, and whether a
//! stream that breaks after content was sent is resumed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ApiKey, ConfigError};

/// One `[[fallbacks]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Its label in logs, metrics and `x-sluice-upstream`.
    pub name: String,
    /// Any OpenAI-compatible upstream. Unset: `upstream.base_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// One of `[[upstream.accounts]]`: its keys and its lanes (unset, with no key of its own: the first
    /// account of the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// A file holding this upstream's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// An environment variable holding this upstream's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The model asked for here, by the model the request named (`"*"`: any other). A model with no entry
    /// is asked for as it is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    /// Its own key, read at load time; never from the file, shown only redacted.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub key: Option<ApiKey>,
}

impl FallbackConfig {
    /// The model to ask this fallback for, for a request that named `model`.
    pub fn model_for<'a>(&'a self, model: &'a str) -> &'a str {
        self.models.get(model).or_else(|| self.models.get("*")).map_or(model, String::as_str)
    }

    /// Whether it brings a key of its own (then it is an account of its own, not one of the primary's).
    pub fn own_key(&self) -> bool {
        self.api_key_file.is_some() || self.api_key_env.is_some()
    }
}

/// `[fallback]`: when a request leaves the primary for a fallback, and stream resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackSettings {
    /// A request that has waited and retried this long while its primary lane is throttled goes to a
    /// fallback.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// A silent primary (no headers within `upstream.header_timeout`) sends the request to a fallback
    /// instead of answering 504.
    pub on_header_timeout: bool,
    /// A stream whose headers came but no content within this long is abandoned for a fallback (nothing
    /// has reached the client yet).
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// A stream that breaks or stalls after content was sent is continued by chat prefix completion.
    pub resume: bool,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        Self {
            after: Duration::from_secs(20),
            on_header_timeout: true,
            first_token_timeout: Duration::from_secs(15),
            resume: true,
        }
    }
}

/// Checks the fallbacks: unique names that are not account names, usable URLs, known accounts.
pub fn validate(fallbacks: &[FallbackConfig], accounts: &[String], primary_url: &str) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = Vec::new();
    for fallback in fallbacks {
        let name = fallback.name.as_str();
        let key = |field: &str| format!("fallbacks ({name:?}).{field}");
        let well_formed = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !well_formed || names.contains(&name) || accounts.iter().any(|a| a == name) || name == "primary" {
            return Err(invalid(
                "fallbacks.name",
                format!("{name:?}"),
                "1 to 64 letters, digits, '-', '_' or '.', unique, and not an account's name or \"primary\"",
            ));
        }
        names.push(name);
        if let Some(url) = &fallback.base_url {
            let uri: Result<http::Uri, _> = url.parse();
            let ok = uri.as_ref().is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(invalid(key("base_url"), format!("{url:?}"), "an http:// or https:// URL"));
            }
        }
        let elsewhere = fallback
            .base_url
            .as_deref()
            .is_some_and(|url| url.trim_end_matches('/') != primary_url.trim_end_matches('/'));
        if elsewhere && fallback.account.is_none() && !fallback.own_key() {
            // The primary's key (or a client's own) must never go to another origin unasked.
            return Err(invalid(
                key("api_key_env"),
                "none, with another base_url",
                "a key of its own (api_key_file or api_key_env), or an account named on purpose",
            ));
        }
        match (&fallback.account, fallback.own_key()) {
            (Some(_), true) => {
                return Err(invalid(key("account"), "an account and a key of its own", "one of them"));
            }
            (Some(account), false) if !accounts.iter().any(|a| a == account) => {
                return Err(invalid(
                    key("account"),
                    format!("{account:?}"),
                    "the name of one of [[upstream.accounts]]",
                ));
            }
            _ => {}
        }
        if fallback.api_key_file.is_some() && fallback.api_key_env.is_some() {
            return Err(invalid(key("api_key_file"), "both api_key_file and api_key_env", "one of them"));
        }
    }
    Ok(())
}

/// Reads each fallback's own key.
pub fn load_keys(
    fallbacks: &mut [FallbackConfig],
    env: &std::collections::HashMap<String, String>,
) -> Result<(), ConfigError> {
    for fallback in fallbacks.iter_mut() {
        let field = |f: &str| format!("fallbacks ({:?}).{f}", fallback.name);
        fallback.key =
            if let Some(path) = &fallback.api_key_file {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    what: "a fallback's key",
                    path: path.clone(),
                    source,
                })?;
                Some(ApiKey::new(&text, path.display().to_string()).ok_or_else(|| {
                    invalid(field("api_key_file"), path.display(), "a file holding one non-empty key")
                })?)
            } else if let Some(var) = &fallback.api_key_env {
                let raw = env.get(var).map(String::as_str).unwrap_or("");
                Some(ApiKey::new(raw, format!("${var}")).ok_or_else(|| {
                    invalid(field("api_key_env"), var, "an environment variable holding the fallback's key")
                })?)
            } else {
                None
            };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback(name: &str) -> FallbackConfig {
        FallbackConfig {
            name: name.into(),
            base_url: None,
            account: None,
            api_key_file: None,
            api_key_env: None,
            models: BTreeMap::from([("deepseek-v4-pro".into(), "deepseek-v4-flash".into()), ("*".into(), "x".into())]),
            key: None,
        }
    }

    #[test]
    fn models_map_by_name_then_star() {
        let f = fallback("flash");
        assert_eq!(f.model_for("deepseek-v4-pro"), "deepseek-v4-flash");
        assert_eq!(f.model_for("anything"), "x");
        let mut plain = fallback("plain");
        plain.models.clear();
        assert_eq!(plain.model_for("anything"), "anything");
    }

    #[test]
    fn fallbacks_are_checked() {
        let accounts = vec!["team-a".to_string()];
        let primary = "https://api.deepseek.com";
        validate(&[fallback("flash")], &accounts, primary).unwrap();
        let mut elsewhere = fallback("other");
        elsewhere.base_url = Some("https://api.other.example".into());
        assert!(validate(&[elsewhere.clone()], &accounts, primary).is_err(), "the primary's key would go elsewhere");
        elsewhere.api_key_env = Some("OTHER_KEY".into());
        validate(&[elsewhere], &accounts, primary).unwrap();
        assert!(validate(&[fallback("flash"), fallback("flash")], &accounts, primary).is_err(), "twice");
        assert!(validate(&[fallback("team-a")], &accounts, primary).is_err(), "an account's name");
        let mut bad = fallback("b");
        bad.base_url = Some("ftp://x".into());
        assert!(validate(&[bad], &accounts, primary).unwrap_err().to_string().contains("fallbacks (\"b\").base_url"));
        let mut unknown = fallback("c");
        unknown.account = Some("team-z".into());
        assert!(validate(&[unknown], &accounts, primary).is_err());
        let mut both = fallback("d");
        both.account = Some("team-a".into());
        both.api_key_env = Some("K".into());
        assert!(validate(&[both], &accounts, primary).is_err());
    }
}
