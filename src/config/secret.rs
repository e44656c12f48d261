//! Secrets: the upstream API key — kept as a ready `Authorization` header value, marked sensitive,
//! and never printed — Debug and Serialize both show a redaction — and the admin token.

use std::fmt;

use http::HeaderValue;
use serde::{Serialize, Serializer};

/// The configured upstream API key and where it came from.
#[derive(Clone, PartialEq)]
pub struct ApiKey {
    authorization: HeaderValue,
    source: String,
}

impl ApiKey {
    /// Builds the key from its raw text (surrounding whitespace dropped). `source` says where it came
    /// from, for `check-config`. Fails if the key is empty or not a valid header value.
    pub fn new(raw: &str, source: impl Into<String>) -> Option<Self> {
        let key = raw.trim();
        if key.is_empty() {
            return None;
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        authorization.set_sensitive(true);
        Some(Self { authorization, source: source.into() })
    }

    /// The `Authorization` header value to send upstream.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey([redacted], from {})", self.source)
    }
}

impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("[redacted] (from {})", self.source))
    }
}

/// A secret from the config file (the admin token): compared in constant time, never shown.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares without an early exit, so timing does not reveal how much of a guess was right.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        let mut diff = secret.len() ^ candidate.len();
        for (i, byte) in secret.iter().enumerate() {
            diff |= usize::from(byte ^ candidate.get(i).copied().unwrap_or(!byte));
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shows_the_key() {
        let key = ApiKey::new(" sk-secret-123\n", "DEEPSEEK_API_KEY").unwrap();
        assert_eq!(key.authorization(), "Bearer sk-secret-123");
        assert!(key.authorization().is_sensitive());
        let shown = format!("{key:?} {}", serde_json::to_string(&key).unwrap());
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("DEEPSEEK_API_KEY"), "{shown}");
    }

    #[test]
    fn secrets_match_exactly_and_stay_hidden() {
        let secret = Secret::new("admin-123");
        assert!(secret.matches(b"admin-123"));
        for wrong in [&b"admin-12"[..], b"admin-1234", b"", b"Admin-123"] {
            assert!(!secret.matches(wrong), "{wrong:?}");
        }
        let shown = format!("{secret:?} {}", serde_json::to_string(&secret).unwrap());
        assert!(!shown.contains("admin-123"), "{shown}");
    }

    #[test]
    fn refuses_empty_and_invalid_keys() {
        assert!(ApiKey::new("  \n", "x").is_none());
        assert!(ApiKey::new("sk-\u{7}bad", "x").is_none());
    }
}
