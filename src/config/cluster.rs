//! `[cluster]`: several sluice instances sharing one account's limits through Redis (or Valkey) —
//! where, under which name, and how long a vanished instance's slots stay taken.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[cluster]`: unset `redis_url` means a single instance, as without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The Redis every instance of the cluster points at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// The namespace of the cluster's keys (`sluice:{name}:…`): several clusters can share one Redis.
    pub name: String,
    /// A crashed instance's slots come back after this.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { redis_url: None, name: "default".into(), lease_ttl: Duration::from_secs(15) }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(invalid(
                "cluster.name",
                format!("{:?}", self.name),
                "1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(3600) {
            return Err(invalid("cluster.lease_ttl", humantime::format_duration(self.lease_ttl), "from 1s to 1h"));
        }
        if let Some(url) = self.redis_url.as_deref() {
            super::cache::check_redis_url("cluster.redis_url", url)?;
        }
        Ok(())
    }
}
