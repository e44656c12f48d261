//! The cache's Redis backend against a real `redis-server` (Debian's, installed by
//! `scripts/install-test-deps`), started by each test on a free port of 127.0.0.1: entries shared by two
//! sluices, and Redis stopped or stalled mid-run costing no client an error.

mod support;

use std::time::Duration;

use sluice::config::{CacheBackend, Config};
use support::redis_server::Redis;
use support::*;

fn with_redis(mock: &Mock, redis: &Redis) -> Config {
    let mut config = config_for(mock);
    config.cache.enabled = true;
    config.cache.backend = CacheBackend::Redis;
    config.cache.redis_url = Some(redis.url());
    config
}

const PROMPT: &str = r#"{"model":"deepseek-v4-flash","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;

async fn post(sluice: &Sluice, body: &str) -> Answer {
    call("POST", &sluice.url("/v1/chat/completions"), &[("content-type", "application/json")], body.to_string()).await
}

/// Asks until the answer is a hit (sluice connects to Redis and writes entries in the background);
/// returns how many were not.
async fn until_hit(sluice: &Sluice, body: &str) -> usize {
    for misses in 0..200 {
        let answer = post(sluice, body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        if answer.header("x-sluice-cache") == "hit" {
            return misses;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never a hit");
}

#[tokio::test]
async fn sluices_sharing_a_redis_share_its_entries() {
    let redis = Redis::start().await;
    let mock = Mock::start(|_, _| Reply::json(200, completion("from redis"))).await;
    let a = Sluice::start(with_redis(&mock, &redis)).await;
    let b = Sluice::start(with_redis(&mock, &redis)).await;
    let misses = until_hit(&a, PROMPT).await;
    assert!(misses >= 1);
    for _ in 0..200 {
        if call("GET", &b.url("/status"), &[], "").await.json()["cache"]["connected"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let from_b = post(&b, PROMPT).await;
    assert_eq!(from_b.header("x-sluice-cache"), "hit", "the entry another sluice stored");
    assert_eq!(from_b.json()["choices"][0]["message"]["content"], "from redis");
    assert_eq!(mock.arrivals(), misses, "only misses reached the upstream");
    let ttl = redis.command(&["EVAL", "return redis.call('PTTL', redis.call('KEYS', 'sluice:cache:*')[1])", "0"]).await;
    let Ok(redis::Value::Int(millis)) = ttl else { panic!("{ttl:?}") };
    assert!(millis > 0 && millis <= 3_600_000, "the entry expires with cache.ttl in Redis: {millis}");
}

#[tokio::test]
async fn redis_stopped_or_stalled_mid_run_costs_no_client_an_error() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let mock = Mock::start(|_, index| Reply::json(200, completion(&format!("answer {index}")))).await;
    let sluice = Sluice::start(with_redis(&mock, &redis)).await;
    until_hit(&sluice, PROMPT).await;

    // Stalled: Redis busy for a second; reads give up after 50 ms and the upstream answers.
    let stall = tokio::spawn({
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let _: redis::RedisResult<()> =
                redis::cmd("DEBUG").arg("SLEEP").arg("1").query_async(&mut connection).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = post(&sluice, PROMPT).await;
    assert_eq!((during.status, during.header("x-sluice-cache")), (200, "miss"), "a slow Redis is a miss");
    stall.await.unwrap();

    // Stopped: every request still answered, from the upstream.
    redis.stop();
    for n in 0..20 {
        let body = if n % 2 == 0 { PROMPT.to_string() } else { PROMPT.replace("hi", &format!("hi {n}")) };
        let answer = post(&sluice, &body).await;
        assert_eq!(answer.status, 200, "request {n} while Redis is down: {}", answer.text());
    }
    let errors = sluice.proxy.metrics().cache.backend_errors();
    assert!(errors >= 1, "the failures are counted: {errors}");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_cache_backend_errors_total"), "{metrics}");

    // Back: sluice reconnects by itself.
    let _redis = Redis::start_on(port).await;
    until_hit(&sluice, PROMPT).await;
}
