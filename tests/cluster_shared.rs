//! What several instances share through a real `redis-server` besides the lanes: the global rate (one
//! GCRA in Redis), the configured clients' daily token counts, and keys the upstream refused.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::cluster::{clustered, joined};
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
                invocation.arg(60_000_000u64).arg(5).arg(2);
                let (taken, wait_us): (i64, i64) = invocation.invoke_async(&mut connection).await.unwrap();
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
