//! `[cache]`: the response cache and request coalescing — whether, where (memory or Redis), how long and
//! how much, and which requests are eligible — and the byte sizes such keys take ("256MiB").

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[cache]`: never pay twice for the same answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve repeated requests from the cache, and let identical requests in flight share one upstream call.
    pub enabled: bool,
    /// Where entries live: `memory` (this process) or `redis` (shared by every sluice using it).
    pub backend: CacheBackend,
    /// The Redis of `backend = "redis"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// How long an entry is served.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The memory backend's bound: entries are evicted (least recently used first) beyond it.
    pub max_bytes: ByteSize,
    /// Only requests whose answer is meant to repeat are eligible: `temperature` 0 and `n` absent or 1.
    pub deterministic_only: bool,
    /// An eligible request identical to one queued or in flight joins it instead of calling again.
    pub coalesce: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            backend: CacheBackend::Memory,
            redis_url: None,
            ttl: Duration::from_secs(3600),
            max_bytes: ByteSize(256 * 1024 * 1024),
            deterministic_only: true,
            coalesce: true,
        }
    }
}

/// Where cache entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    Memory,
    Redis,
}

/// A number of bytes, written as a number or with a unit: "256MiB", "64 KiB", "1GB", "1048576".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "SizeText", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeText> for ByteSize {
    type Error = String;
    fn try_from(value: SizeText) -> Result<Self, String> {
        match value {
            SizeText::Number(n) => Ok(ByteSize(n)),
            SizeText::Text(text) => text.parse(),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let expected = || format!("{text:?} is not a size such as \"256MiB\", \"64KiB\" or \"1048576\"");
        let number: u64 = number.parse().map_err(|_| expected())?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(expected()),
        };
        number.checked_mul(scale).map(ByteSize).ok_or_else(expected)
    }
}

impl From<ByteSize> for String {
    fn from(size: ByteSize) -> String {
        size.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= scale && self.0 % scale == 0 {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Checks a Redis URL (never echoing it: it may carry a password).
pub fn check_redis_url(key: &str, url: &str) -> Result<(), super::ConfigError> {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("redis+unix://") || url.starts_with("unix://");
    if !scheme_ok || redis::IntoConnectionInfo::into_connection_info(url).is_err() {
        let shown = url.split("://").next().unwrap_or("?");
        return Err(super::invalid(
            key,
            format!("a {shown}:// URL"),
            "a redis:// URL such as \"redis://127.0.0.1:6379/0\" or a socket as \"redis+unix:///run/redis.sock\" (TLS is not built in)",
        ));
    }
    Ok(())
}

/// A URL with the password in its authority (`redis://user:secret@host`) replaced by `[redacted]`, and
/// its query (where `?pass=` may be) too.
pub fn without_password(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, _)) => return format!("{}?[redacted]", without_password(base)),
        None => url,
    };
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{scheme}://{}:[redacted]{}", &rest[..colon], &rest[at..]),
            None => format!("{scheme}://[redacted]{}", &rest[at..]),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(without_password("redis://:hunter2@10.0.0.1:6379/0"), "redis://:[redacted]@10.0.0.1:6379/0");
        assert_eq!(without_password("redis://app:hunter2@cache/1"), "redis://app:[redacted]@cache/1");
        assert_eq!(without_password("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(without_password("redis+unix:///run/redis.sock"), "redis+unix:///run/redis.sock");
        assert_eq!(
            without_password("redis+unix:///run/r.sock?db=1&pass=hunter2"),
            "redis+unix:///run/r.sock?[redacted]"
        );
    }

    #[test]
    fn sizes_read_and_write() {
        for (text, bytes) in [("256MiB", 256 << 20), ("64 KiB", 64 << 10), ("1GB", 1_000_000_000), ("123", 123)] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "MiB", "12 parsecs", "-1KiB", "99999999999999999999GiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
