//! `[[clients]]` and `server.require_client_token`: the local callers sluice knows by token — each token
//! kept only as its SHA-256 — with what each may use: a priority ceiling, a share of the upstream
//! (concurrency, rate), of the queue, and of the day's tokens.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{invalid, ConfigError, Rate};

/// The metrics label of callers that are not a configured client.
pub const ANONYMOUS: &str = "anonymous";

/// One `[[clients]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's name: its label in metrics, logs and `/status`.
    pub name: String,
    /// SHA-256 of the client's token, hex (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// A file holding the token itself (instead of `token_sha256`); only its hash is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The highest `x-sluice-priority` the client may ask for.
    #[serde(default = "highest")]
    pub max_priority: PriorityName,
    /// Upstream slots the client may hold at once (it waits beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// The client's own request rate (it waits beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// The client's share of the queue (503 `sluice_queue_full` beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<usize>,
    /// Prompt + completion tokens per UTC day (429 `sluice_quota_exceeded` beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_tokens: Option<u64>,
}

/// A priority class as the config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityName {
    High,
    Normal,
    Low,
}

fn highest() -> PriorityName {
    PriorityName::High
}

impl ClientConfig {
    /// The token's hash, once `token_sha256` is set (by the file or by `load_tokens`).
    pub fn token_hash(&self) -> Option<[u8; 32]> {
        let hex = self.token_sha256.as_deref()?.trim();
        if hex.len() != 64 {
            return None;
        }
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(hash)
    }

    fn key(&self, field: &str) -> String {
        format!("clients ({:?}).{field}", self.name)
    }
}

/// The hex SHA-256 of a token (what `token_sha256` holds).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks every client: a usable name, one way to its token, limits that allow something.
pub fn validate(clients: &[ClientConfig]) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = Vec::new();
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    for client in clients {
        let name = client.name.as_str();
        let well_formed = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !well_formed || name == ANONYMOUS {
            return Err(invalid(
                "clients.name",
                format!("{name:?}"),
                "1 to 64 letters, digits, '-', '_' or '.', and not \"anonymous\"",
            ));
        }
        if names.contains(&name) {
            return Err(invalid("clients.name", format!("{name:?}"), "a name used by one client only"));
        }
        names.push(name);
        match (&client.token_sha256, &client.token_file) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid(
                    client.key("token_sha256"),
                    "both or neither of token_sha256 and token_file",
                    "exactly one of them (`sluice client new NAME` prints a token and its hash)",
                ));
            }
            (Some(_), None) => {
                let hash = client.token_hash().ok_or_else(|| {
                    invalid(client.key("token_sha256"), "that value", "64 hex digits: the SHA-256 of the token")
                })?;
                if hashes.contains(&hash) {
                    return Err(invalid(client.key("token_sha256"), "a token of another client", "a token of its own"));
                }
                hashes.push(hash);
            }
            (None, Some(_)) => {}
        }
        if client.max_concurrency == Some(0) {
            return Err(invalid(client.key("max_concurrency"), 0, "at least 1 (leave it out for no cap)"));
        }
        if client.max_queued == Some(0) {
            return Err(invalid(client.key("max_queued"), 0, "at least 1 (leave it out for no cap)"));
        }
        if client.daily_tokens == Some(0) {
            return Err(invalid(client.key("daily_tokens"), 0, "at least 1 (leave it out for no quota)"));
        }
    }
    Ok(())
}

/// Reads each `token_file` and keeps only its hash (in `token_sha256`).
pub fn load_tokens(clients: &mut [ClientConfig]) -> Result<(), ConfigError> {
    for client in clients.iter_mut() {
        let Some(path) = client.token_file.take() else { continue };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            what: "a client token",
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(invalid(client.key("token_file"), path.display(), "a file holding a non-empty token"));
        }
        client.token_sha256 = Some(token_sha256(&text));
    }
    let hashes: Vec<_> = clients.iter().filter_map(ClientConfig::token_hash).collect();
    for (i, hash) in hashes.iter().enumerate() {
        if hashes[..i].contains(hash) {
            return Err(invalid("clients.token_file", "a token of another client", "a token of its own"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, token: &str) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            token_sha256: Some(token_sha256(token)),
            token_file: None,
            max_priority: PriorityName::High,
            max_concurrency: None,
            rate: None,
            max_queued: None,
            daily_tokens: None,
        }
    }

    #[test]
    fn hashes_read_back_and_clients_are_checked() {
        let a = client("batch-eval", "test");
        assert_eq!(a.token_sha256.as_deref().unwrap().len(), 64);
        assert!(a.token_sha256.as_deref().unwrap().starts_with("9f86d0"), "sha256(\"test\")");
        assert_eq!(a.token_hash().unwrap()[0], 0x9f);
        validate(&[a.clone(), client("web", "other")]).unwrap();
        let message = validate(&[a.clone(), client("batch-eval", "x")]).unwrap_err().to_string();
        assert!(message.contains("clients.name") && message.contains("batch-eval"), "{message}");
        assert!(validate(&[a.clone(), client("b", "test")]).is_err(), "the same token twice");
        assert!(validate(&[client("anonymous", "x")]).is_err());
        assert!(validate(&[client("has space", "x")]).is_err());
        let mut bad = client("c", "x");
        bad.token_sha256 = Some("xyz".into());
        let message = validate(&[bad]).unwrap_err().to_string();
        assert!(message.contains("clients (\"c\").token_sha256"), "{message}");
        let mut neither = client("d", "x");
        neither.token_sha256 = None;
        assert!(validate(&[neither]).is_err());
        let mut zero = client("e", "x");
        zero.max_concurrency = Some(0);
        assert!(validate(&[zero]).is_err());
    }

    #[test]
    fn a_token_file_leaves_only_its_hash() {
        let path = std::env::temp_dir().join(format!("sluice-client-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let mut clients = vec![client("a", "x")];
        clients[0].token_sha256 = None;
        clients[0].token_file = Some(path.clone());
        load_tokens(&mut clients).unwrap();
        assert_eq!(clients[0].token_sha256.as_deref(), Some(token_sha256("s3cret-token").as_str()));
        assert!(clients[0].token_file.is_none());
        std::fs::remove_file(path).unwrap();
    }
}
