//! The upstream API key: kept as a ready `Authorization` header value, marked sensitive,
//! and never printed — Debug and Serialize both show a redaction.

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
    fn refuses_empty_and_invalid_keys() {
        assert!(ApiKey::new("  \n", "x").is_none());
        assert!(ApiKey::new("sk-\u{7}bad", "x").is_none());
    }
}
