//! Several sluice instances sharing one account's limits through a real `redis-server` (started on a
//! free port): the lease script's atomicity, instances in front of one hidden cap, an instance killed
//! mid-stream (its leases come back), Redis stopped and restarted mid-run (no client error).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::cluster::{clustered, joined, leases, status};
use support::daemon::Daemon;
use support::redis_server::Redis;
use support::*;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_lease_more_than_the_limit() {
    let redis = Redis::start().await;
    let script = redis::Script::new(sluice::cluster::CLAIM_SCRIPT);
    let client = redis::Client::open(redis.url()).unwrap();
    let claims: Vec<_> = (0..40)
        .map(|n| {
            let (script, client) = (script.clone(), client.clone());
            tokio::spawn(async move {
                let mut connection = client.get_multiplexed_async_connection().await.unwrap();
                let mut invocation = script.key("t:state");
                invocation.key("t:held").key("t:expiry").key("t:wanted");
                // instance, desired, floor, cap, initial, ttl_ms, keep_ms, channel
                invocation.arg(format!("i{n}")).arg(3).arg(0).arg(10).arg(10).arg(60_000).arg(60_000).arg("t:events");
                let (held, _, _, _, _): (i64, i64, i64, i64, i64) =
                    invocation.invoke_async(&mut connection).await.unwrap();
                held
            })
        })
        .collect();
    let mut granted = 0;
    for claim in claims {
        granted += claim.await.unwrap();
    }
    assert_eq!(granted, 10, "40 instances asking for 3 each share exactly the limit of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_gives_up_its_share_to_another_that_wants_slots() {
    let redis = Redis::start().await;
    let script = redis::Script::new(sluice::cluster::CLAIM_SCRIPT);
    let mut connection = redis.connection().await.unwrap();
    // instance, desired, floor (in flight) → (held, granted), for a lane whose limit is 10
    let mut claim = async |instance: &str, desired: u32, floor: u32| {
        let mut invocation = script.key("f:state");
        invocation.key("f:held").key("f:expiry").key("f:wanted");
        invocation.arg(instance).arg(desired).arg(floor).arg(10).arg(10).arg(60_000).arg(60_000).arg("f:events");
        let (held, _, _, _, granted): (i64, i64, i64, i64, i64) =
            invocation.invoke_async(&mut connection).await.unwrap();
        (held, granted)
    };
    assert_eq!(claim("a", 10, 0).await, (10, 10), "alone, a gets the whole limit");
    assert_eq!(claim("b", 10, 0).await, (0, 0), "nothing is free yet");
    assert_eq!(claim("a", 10, 10).await, (10, 5), "a keeps what is in flight but may use only its share");
    assert_eq!(claim("a", 10, 4).await, (5, 5), "as a's requests end, its lease shrinks to its share");
    assert_eq!(claim("b", 10, 0).await, (5, 5), "and b gets the other half");
    assert_eq!(claim("b", 2, 2).await, (2, 2), "b wanting less…");
    assert_eq!(claim("a", 10, 5).await, (8, 8), "…leaves the rest to a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_in_front_of_one_hidden_cap_share_it() {
    const CAP: usize = 4;
    let redis = Redis::start().await;
    let mock = Mock::start_capped(Some(CAP), |_, _| Reply::Stream {
        status: 200,
        content_type: "application/json",
        chunks: vec![Chunk::Pause(Duration::from_millis(20)), data(completion_static())],
        ending: Ending::Complete,
    })
    .await;
    let instances: Vec<Arc<Sluice>> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(Arc::new(Sluice::start(clustered(&mock, &redis, "shared")).await));
        }
        v
    };
    let urls: Vec<String> = instances.iter().map(|s| s.url("/status")).collect();
    joined(&urls, 3).await;
    let workers: Vec<_> = (0..6 * CAP)
        .map(|n| {
            let sluice = instances[n % 3].clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..8 {
                    statuses.push(chat(&sluice, "deepseek-v4-flash", &[]).await.status);
                }
                statuses
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.await.unwrap().iter().all(|s| *s == 200), "no client error");
    }
    let (_, limit) = leases(&redis, "shared", "deepseek-v4-flash").await;
    assert!(limit as usize <= CAP + 1, "the shared limit was learned near the cap: {limit}");
    let mut leased = -1;
    for _ in 0..100 {
        leased = leases(&redis, "shared", "deepseek-v4-flash").await.0;
        if leased == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leased, 0, "once the work is done, the leases are given back");
    let share = mock.over_cap() as f64 / mock.arrivals() as f64;
    assert!(share < 0.15, "the cap was shared, not hammered: {share:.2} of attempts throttled");
    let lanes = &status(&urls[0]).await["cluster"]["lanes"];
    assert!(lanes.as_array().is_some_and(|l| !l.is_empty()), "{lanes}");
}

/// A completion body for the static scripted replies.
fn completion_static() -> &'static str {
    Box::leak(completion("shared").into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_leases_come_back_within_the_lease_ttl() {
    let redis = Redis::start().await;
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let config = format!(
        "[cluster]\nredis_url = \"{}\"\nname = \"kill\"\nlease_ttl = \"2s\"\n[limits]\nadaptive = false\n",
        redis.url()
    );
    let doomed = Daemon::start(&config, &mock.url()).await;
    let survivor = Sluice::start({
        let mut config = clustered(&mock, &redis, "kill");
        config.limits.adaptive = false;
        config
    })
    .await;
    joined(&[doomed.url("/status"), survivor.url("/status")], 2).await;
    let held = tokio::spawn({
        let url = doomed.url("/v1/chat/completions");
        async move { call("POST", &url, &[], r#"{"model":"deepseek-v4-flash","messages":[]}"#.to_string()).await }
    });
    assert!(eventually(Duration::from_secs(10), || mock.arrivals() == 1).await);
    for _ in 0..100 {
        if leases(&redis, "kill", "deepseek-v4-flash").await.0 >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(leases(&redis, "kill", "deepseek-v4-flash").await.0 >= 1, "the stream holds a lease");
    drop(doomed); // SIGKILL: no goodbye, no release
    let killed = tokio::time::Instant::now();
    held.abort(); // its client's connection went with the instance
    let mut back = None;
    for _ in 0..300 {
        // The survivor's claims purge lapsed leases; ask it to claim by sending a request.
        assert_eq!(chat(&survivor, "deepseek-v4-flash", &[]).await.status, 200);
        if leases(&redis, "kill", "deepseek-v4-flash").await.0 <= 1 {
            back = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = back.expect("the killed instance's lease came back");
    assert!(back <= Duration::from_secs(4), "within the lease TTL (2 s) and a renewal: {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_costs_no_client_an_error_and_the_instances_rejoin() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let mock = Mock::start(|_, _| Reply::json(200, completion("ok"))).await;
    let a = Sluice::start(clustered(&mock, &redis, "outage")).await;
    let b = Sluice::start(clustered(&mock, &redis, "outage")).await;
    let urls = [a.url("/status"), b.url("/status")];
    joined(&urls, 2).await;
    for sluice in [&a, &b] {
        assert_eq!(chat(sluice, "deepseek-v4-flash", &[]).await.status, 200);
    }
    redis.stop();
    for n in 0..20 {
        let sluice = if n % 2 == 0 { &a } else { &b };
        let answer = tokio::time::timeout(Duration::from_secs(10), chat(sluice, "deepseek-v4-flash", &[])).await;
        assert_eq!(answer.expect("answered while Redis is down").status, 200, "request {n}");
    }
    assert!(eventually(Duration::from_secs(10), || true).await);
    let down = status(&urls[0]).await;
    assert_eq!(down["cluster"]["connected"], false, "{down}");
    let metrics = call("GET", &a.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_cluster_connected 0"), "{metrics}");
    let _redis = Redis::start_on(port).await;
    joined(&urls, 2).await;
    assert_eq!(chat(&a, "deepseek-v4-flash", &[]).await.status, 200);
}
