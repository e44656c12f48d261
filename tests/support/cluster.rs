//! Helpers for tests of several instances sharing a real `redis-server`: a clustered config, waiting
//! until every instance joined, and reading a lane's leases from Redis itself.

use std::time::Duration;

use sluice::config::Config;

use super::redis_server::Redis;
use super::{call, config_for, Mock};

pub fn clustered(mock: &Mock, redis: &Redis, name: &str) -> Config {
    let mut config = config_for(mock);
    config.cluster.redis_url = Some(redis.url());
    config.cluster.name = name.into();
    config.cluster.lease_ttl = Duration::from_secs(2);
    config
}

pub async fn status(url: &str) -> serde_json::Value {
    call("GET", url, &[], "").await.json()
}

/// Waits until every instance's `/status` says it is connected and sees `members` instances.
pub async fn joined(urls: &[String], members: u64) {
    for _ in 0..500 {
        let mut all = true;
        for url in urls {
            let cluster = &status(url).await["cluster"];
            all &= cluster["connected"] == true && cluster["members"].as_u64() == Some(members);
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the instances never all joined");
}

/// The leases every instance holds on a lane, summed, and the lane's limit (from Redis itself).
pub async fn leases(redis: &Redis, name: &str, model: &str) -> (i64, i64) {
    let base = format!("sluice:{name}:lane:default:{model}");
    let held = redis.command(&["HVALS", &format!("{base}:held")]).await.unwrap();
    let sum = match held {
        redis::Value::Array(values) => values
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).parse::<i64>().unwrap_or(0),
                _ => 0,
            })
            .sum(),
        _ => 0,
    };
    let limit = match redis.command(&["HGET", &format!("{base}:state"), "limit"]).await.unwrap() {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).parse().unwrap_or(0),
        _ => 0,
    };
    (sum, limit)
}
