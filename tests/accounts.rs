//! Accounts and keys against a mock that limits per account: two accounts double the capacity and each
//! stays under its own cap; a revoked key is set aside and another serves; an account out of balance
//! pauses and comes back when its balance does; with no account left the client gets the upstream's own
//! answer at once. Under tokio's paused clock.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::accounts::with_accounts;
use support::*;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(60);

fn held_for(pause: Duration) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, _| Reply::Stream {
        status: 200,
        content_type: "application/json",
        chunks: vec![Chunk::Pause(pause), data(r#"{"ok":true}"#)],
        ending: Ending::Complete,
    }
}

#[tokio::test(start_paused = true)]
async fn two_accounts_double_the_capacity_each_under_its_own_cap() {
    const CAP: usize = 4;
    const PER_WORKER: usize = 20;
    let hold = Duration::from_millis(100);
    let (a, b) = (MockAccount::new("a", &["sk-a"], Some(CAP)), MockAccount::new("b", &["sk-b"], Some(CAP)));
    let mock = Mock::start_accounts(vec![a.clone(), b.clone()], held_for(hold)).await;
    let sluice = Arc::new(Sluice::start(with_accounts(&mock, &[("a", &["sk-a"]), ("b", &["sk-b"])])).await);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..4 * CAP {
        let sluice = sluice.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..PER_WORKER {
                let answer = chat(&sluice, "deepseek-v4-flash", &[("x-sluice-client", &format!("w{worker}"))]).await;
                assert_eq!(answer.status, 200, "{}", answer.text());
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let requests = 4 * CAP * PER_WORKER;
    let ideal = hold * (requests / (2 * CAP)) as u32;
    let took = started.elapsed();
    assert!(took.as_secs_f64() <= 1.3 * ideal.as_secs_f64(), "took {took:?}; two accounts' ideal {ideal:?}");
    assert!(a.max_inflight() <= CAP && b.max_inflight() <= CAP);
    assert!(a.max_inflight() >= CAP - 1 && b.max_inflight() >= CAP - 1, "both accounts were used to their capacity");
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    let accounts: Vec<&str> =
        status["accounts"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(accounts, ["a", "b"]);
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_upstream_attempts_total{status=\"200\",account=\"a\"}"), "{metrics}");
    assert!(metrics.contains("sluice_inflight{model=\"deepseek-v4-flash\",account=\"b\"}"), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn a_revoked_key_is_set_aside_and_the_client_never_sees_the_401() {
    let account = MockAccount::new("a", &["sk-1", "sk-2"], None);
    account.revoke("sk-1");
    let mock = Mock::start_accounts(vec![account.clone()], |_, _| Reply::json(200, completion("ok"))).await;
    let sluice = Sluice::start(with_accounts(&mock, &[("a", &["sk-1", "sk-2"])])).await;
    for _ in 0..6 {
        let answer = chat(&sluice, "m", &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let refused = mock.requests().iter().filter(|r| r.headers["authorization"] == "Bearer sk-1").count();
    assert_eq!(refused, 1, "the revoked key was tried once, then set aside");
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["accounts"][0]["keys_disabled"], 1);
    assert_eq!(status["accounts"][0]["available"], true);
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_account_keys{account=\"a\",state=\"disabled\"} 1"), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn with_every_key_refused_the_client_gets_the_upstreams_401_at_once() {
    let account = MockAccount::new("a", &["sk-1"], None);
    account.revoke("sk-1");
    let mock = Mock::start_accounts(vec![account], |_, _| Reply::json(200, completion("ok"))).await;
    let sluice = Sluice::start(with_accounts(&mock, &[("a", &["sk-1"])])).await;
    let started = Instant::now();
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 401);
    assert!(answer.text().contains("Authentication Fails"), "the upstream's own body: {}", answer.text());
    let again = chat(&sluice, "m", &[]).await;
    assert_eq!(again.status, 401);
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not after a wait");
    assert_eq!(mock.arrivals(), 1, "no more attempts with a refused key");
}

#[tokio::test(start_paused = true)]
async fn an_account_out_of_balance_pauses_and_resumes_with_its_balance() {
    let (a, b) = (MockAccount::new("a", &["sk-a"], None), MockAccount::new("b", &["sk-b"], None));
    a.set_available(false);
    let mock = Mock::start_accounts(vec![a.clone(), b.clone()], |_, _| Reply::json(200, completion("ok"))).await;
    let mut config = with_accounts(&mock, &[("a", &["sk-a"]), ("b", &["sk-b"])]);
    config.upstream.balance.poll = Duration::from_secs(30);
    let sluice = Sluice::start(config).await;
    for _ in 0..6 {
        assert_eq!(chat(&sluice, "m", &[]).await.status, 200);
    }
    let on_a = |mock: &Mock| mock.requests().iter().filter(|r| r.headers["authorization"] == "Bearer sk-a").count();
    let paid_on_a = on_a(&mock);
    assert!(paid_on_a <= 2, "a answered 402 and was paused ({paid_on_a} requests with its key)");
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["accounts"][0]["paused"], true);
    // The balance comes back; the next poll sees it and a serves again.
    a.set_available(true);
    tokio::time::sleep(Duration::from_secs(31)).await;
    let before = on_a(&mock);
    for _ in 0..6 {
        assert_eq!(chat(&sluice, "m", &[]).await.status, 200);
    }
    assert!(on_a(&mock) > before + 1, "a serves again once its balance is available");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_account_available{account=\"a\"} 1"), "{metrics}");
    assert!(metrics.contains("sluice_account_balance{account=\"a\",currency=\"CNY\"} 42.5"), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn with_every_account_out_of_balance_the_client_gets_the_402_promptly() {
    let (a, b) = (MockAccount::new("a", &["sk-a"], None), MockAccount::new("b", &["sk-b"], None));
    a.set_available(false);
    b.set_available(false);
    let mock = Mock::start_accounts(vec![a, b], |_, _| Reply::json(200, completion("ok"))).await;
    let sluice = Sluice::start(with_accounts(&mock, &[("a", &["sk-a"]), ("b", &["sk-b"])])).await;
    let started = Instant::now();
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 402, "{}", answer.text());
    assert!(answer.text().contains("Insufficient Balance"));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(tokio::time::timeout(LIMIT, chat(&sluice, "m", &[])).await.unwrap().status == 402);
}
