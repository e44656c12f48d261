//! What several instances share through a real `redis-server` besides the lanes: the global rate (one
//! GCRA in Redis), the configured clients' daily token counts, and keys the upstream refused.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sluice::config::{token_sha256, ClientConfig, PriorityName};
use support::accounts::with_accounts;
use support::cluster::{clustered, joined, status};
use support::redis_server::Redis;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rate_takers_never_take_more_than_the_burst() {
    let redis = Redis::start().await;
    let script = redis::Script::new(sluice::cluster::RATE_SCRIPT);
    let client = redis::Client::open(redis.url()).unwrap();
    // One token a minute, a burst of 5: whatever the interleaving, 5 tokens go in the first minute.
    let takers: Vec<_> = (0..40)
        .map(|_| {
            let (script, client) = (script.clone(), client.clone());
            tokio::spawn(async move {
                let mut connection = client.get_multiplexed_async_connection().await.unwrap();
                let mut invocation = script.key("r:rate");
                // interval_us, burst, wanted, horizon_us (none: only tokens that conform now)
                invocation.arg(60_000_000u64).arg(5).arg(2).arg(0);
                let (taken, _first, wait_us): (i64, i64, i64) = invocation.invoke_async(&mut connection).await.unwrap();
                (taken, wait_us)
            })
        })
        .collect();
    let mut taken = 0;
    let mut refused_waits = Vec::new();
    for taker in takers {
        let (n, wait_us) = taker.await.unwrap();
        taken += n;
        if n == 0 {
            refused_waits.push(wait_us);
        }
    }
    assert_eq!(taken, 5, "40 takers wanting 2 each share exactly the burst");
    assert!(!refused_waits.is_empty());
    assert!(
        refused_waits.iter().all(|w| *w > 0 && *w <= 60_000_000),
        "a refused taker learns how long until the next token: {refused_waits:?}"
    );
    // Reserving ahead: with a 3-minute horizon, 3 more tokens are reserved, at 1, 2 and 3 minutes.
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut invocation = script.key("r:rate");
    invocation.arg(60_000_000u64).arg(5).arg(10).arg(180_000_000u64);
    let (taken, first_us, _): (i64, i64, i64) = invocation.invoke_async(&mut connection).await.unwrap();
    assert_eq!(taken, 3);
    assert!((55_000_000..=60_000_000).contains(&first_us), "the first reserved conforms in a minute: {first_us}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faster_rate_is_not_held_back_by_a_slower_ones_debt() {
    let redis = Redis::start().await;
    let script = redis::Script::new(sluice::cluster::RATE_SCRIPT);
    let mut connection = redis.connection().await.unwrap();
    let mut take = async |interval_us: u64, burst: u32, wanted: u32, horizon_us: u64| {
        let mut invocation = script.key("d:rate");
        invocation.arg(interval_us).arg(burst).arg(wanted).arg(horizon_us);
        let (taken, _first, _wait): (i64, i64, i64) = invocation.invoke_async(&mut connection).await.unwrap();
        taken
    };
    // One a minute, a burst of 10 taken: ten minutes of debt at that rate.
    assert_eq!(take(60_000_000, 10, 10, 0).await, 10);
    // Reloaded to 100/s: tokens again within moments, not in ten minutes.
    let started = tokio::time::Instant::now();
    let mut taken = 0;
    while taken == 0 && started.elapsed() < Duration::from_secs(5) {
        taken = take(10_000, 1, 5, 500_000).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(taken > 0, "the faster rate got tokens after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_rate() {
    let redis = Redis::start().await;
    let mock = Mock::start(|_, _| Reply::json(200, completion("ok"))).await;
    let rated = || {
        let mut config = clustered(&mock, &redis, "rate");
        config.limits.rate = Some("10/s".parse().unwrap());
        config.limits.burst = Some(1);
        config
    };
    let instances = [Arc::new(Sluice::start(rated()).await), Arc::new(Sluice::start(rated()).await)];
    joined(&[instances[0].url("/status"), instances[1].url("/status")], 2).await;
    // 12 requests at once, 6 on each: alone, each instance would let its 6 go within 0.5 s; sharing
    // one rate of 10/s, the 12 take at least 1.1 s (a slow machine only makes it longer).
    let started = tokio::time::Instant::now();
    let requests: Vec<_> = (0..12)
        .map(|n| {
            let sluice = instances[n % 2].clone();
            tokio::spawn(async move { chat(&sluice, "deepseek-v4-flash", &[]).await.status })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200, "no client error");
    }
    let elapsed = started.elapsed();
    assert_eq!(mock.arrivals(), 12);
    assert!(elapsed >= Duration::from_millis(1050), "one rate for both instances: 12 requests took {elapsed:?}");
}

const BATCH: &str = "sk-sluice-batch-token";

fn batch_client(daily_tokens: u64) -> ClientConfig {
    ClientConfig {
        name: "batch".into(),
        token_sha256: Some(token_sha256(BATCH)),
        token_file: None,
        max_priority: PriorityName::High,
        max_concurrency: None,
        rate: None,
        max_queued: None,
        daily_tokens: Some(daily_tokens),
    }
}

async fn ask_as_batch(sluice: &Sluice) -> Answer {
    let headers = [("content-type", "application/json"), ("authorization", "Bearer sk-sluice-batch-token")];
    let body = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"x"}]}"#;
    call("POST", &sluice.url("/v1/chat/completions"), &headers, body.to_string()).await
}

async fn tokens_today(sluice: &Sluice) -> u64 {
    let status = status(&sluice.url("/status")).await;
    let clients = status["clients"].as_array().cloned().unwrap_or_default();
    clients.iter().find(|c| c["name"] == "batch").and_then(|c| c["tokens_today"].as_u64()).unwrap_or(0)
}

/// Polls until `check` holds (real time: the instances share about once a second).
async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_daily_tokens_are_counted_across_instances() {
    // Each answer uses 5 tokens; the quota is 8: one answer on each instance goes past it.
    let redis = Redis::start().await;
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let with_batch = || {
        let mut config = clustered(&mock, &redis, "quota");
        config.clients = vec![batch_client(8)];
        config
    };
    let (a, b) = (Sluice::start(with_batch()).await, Sluice::start(with_batch()).await);
    joined(&[a.url("/status"), b.url("/status")], 2).await;
    assert_eq!(ask_as_batch(&a).await.status, 200);
    assert!(within(Duration::from_secs(10), async || tokens_today(&b).await == 5).await, "b learns of a's 5 tokens");
    assert_eq!(ask_as_batch(&b).await.status, 200, "5 of 8 used: b lets one more through");
    assert!(within(Duration::from_secs(10), async || tokens_today(&a).await == 10).await, "a learns of b's");
    let refused = ask_as_batch(&a).await;
    assert_eq!((refused.status, refused.error_type().as_str()), (429, "sluice_quota_exceeded"), "{}", refused.text());
    assert_eq!(mock.arrivals(), 2);
    // Each instance writes its totals again every second: the count stays, it does not grow.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!((tokens_today(&a).await, tokens_today(&b).await), (10, 10));
    let day = redis.command(&["KEYS", "sluice:quota:tokens:*"]).await.unwrap();
    assert!(matches!(&day, redis::Value::Array(keys) if keys.len() == 1), "one count of the day: {day:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_on_one_instance_is_set_aside_on_all() {
    let redis = Redis::start().await;
    let account = MockAccount::new("a", &["sk-1", "sk-2"], None);
    account.revoke("sk-1");
    let mock = Mock::start_accounts(vec![account.clone()], |_, _| Reply::json(200, completion("ok"))).await;
    let keyed = || {
        let mut config = with_accounts(&mock, &[("a", &["sk-1", "sk-2"])]);
        let clustered = clustered(&mock, &redis, "keys");
        config.cluster = clustered.cluster;
        config
    };
    let (a, b) = (Sluice::start(keyed()).await, Sluice::start(keyed()).await);
    joined(&[a.url("/status"), b.url("/status")], 2).await;
    for _ in 0..2 {
        assert_eq!(chat(&a, "m", &[]).await.status, 200);
    }
    let refused = |mock: &Mock| mock.requests().iter().filter(|r| r.headers["authorization"] == "Bearer sk-1").count();
    assert_eq!(refused(&mock), 1, "a tried the revoked key once");
    let disabled = async |sluice: &Sluice| status(&sluice.url("/status")).await["accounts"][0]["keys_disabled"] == 1;
    assert!(within(Duration::from_secs(10), async || disabled(&b).await).await, "b set the key aside too");
    for _ in 0..4 {
        assert_eq!(chat(&b, "m", &[]).await.status, 200);
    }
    assert_eq!(refused(&mock), 1, "b never tried the key a saw refused");
    let stored = redis.command(&["ZRANGE", "sluice:keys:keys:refused", "0", "-1"]).await.unwrap();
    let redis::Value::Array(fingerprints) = stored else { panic!("{stored:?}") };
    assert_eq!(fingerprints.len(), 1);
    let text = format!("{fingerprints:?}");
    assert!(!text.contains("sk-1"), "a fingerprint, never the key: {text}");
    // The cluster forgets (the operator fixed the key and cleared it): b takes the key back.
    redis.command(&["DEL", "sluice:keys:keys:refused"]).await.unwrap();
    let enabled = async |sluice: &Sluice| status(&sluice.url("/status")).await["accounts"][0]["keys_disabled"] == 0;
    assert!(within(Duration::from_secs(10), async || enabled(&b).await).await, "b uses the key again");
    assert!(disabled(&a).await, "a, which saw it refused itself, keeps it aside until a reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_out_of_balance_on_one_instance_is_paused_on_all() {
    let redis = Redis::start().await;
    let (a, b) = (MockAccount::new("a", &["sk-a"], None), MockAccount::new("b", &["sk-b"], None));
    a.set_available(false);
    let mock = Mock::start_accounts(vec![a.clone(), b.clone()], |_, _| Reply::json(200, completion("ok"))).await;
    let keyed = || {
        let mut config = with_accounts(&mock, &[("a", &["sk-a"]), ("b", &["sk-b"])]);
        config.cluster = clustered(&mock, &redis, "balance").cluster;
        config
    };
    let (first, second) = (Sluice::start(keyed()).await, Sluice::start(keyed()).await);
    joined(&[first.url("/status"), second.url("/status")], 2).await;
    let on_a = |mock: &Mock| mock.requests().iter().filter(|r| r.headers["authorization"] == "Bearer sk-a").count();
    while on_a(&mock) == 0 {
        assert_eq!(chat(&first, "m", &[]).await.status, 200);
    }
    let paused = async |sluice: &Sluice| status(&sluice.url("/status")).await["accounts"][0]["paused"] == true;
    assert!(within(Duration::from_secs(10), async || paused(&second).await).await, "the second paused a too");
    let seen = on_a(&mock);
    for _ in 0..6 {
        assert_eq!(chat(&second, "m", &[]).await.status, 200);
    }
    assert_eq!(on_a(&mock), seen, "the second never sent a request on the account out of balance");
}
