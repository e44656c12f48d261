//! Local clients against the mock upstream: tokens (required or not), identities that cannot be spoofed,
//! priority ceilings, quotas that wait (concurrency) or refuse (queue share, daily tokens), reloads —
//! and, with the real binary, a day's token count that survives a restart.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sluice::config::{token_sha256, ClientConfig, Config, PriorityName};
use support::daemon::Daemon;
use support::*;
use tokio::sync::Notify;

const BATCH: &str = "sk-sluice-batch-token";
const WEB: &str = "sk-sluice-web-token";

fn client(name: &str, token: &str) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        token_sha256: Some(token_sha256(token)),
        token_file: None,
        max_priority: PriorityName::High,
        max_concurrency: None,
        rate: None,
        max_queued: None,
        daily_tokens: None,
    }
}

fn with_clients(mock: &Mock, clients: Vec<ClientConfig>, required: bool) -> Config {
    let mut config = config_for(mock);
    config.clients = clients;
    config.server.require_client_token = required;
    config
}

async fn ask(sluice: &Sluice, token: Option<&str>, extra: &[(&str, &str)], content: &str) -> Answer {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    headers.extend_from_slice(extra);
    let body = serde_json::json!({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": content}]});
    call("POST", &sluice.url("/v1/chat/completions"), &headers, body.to_string()).await
}

async fn status(sluice: &Sluice) -> serde_json::Value {
    call("GET", &sluice.url("/status"), &[], "").await.json()
}

fn row<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["clients"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

#[tokio::test]
async fn with_tokens_required_only_configured_clients_get_through() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let sluice = Sluice::start(with_clients(&mock, vec![client("batch", BATCH)], true)).await;
    for token in [None, Some("sk-unknown"), Some(TEST_KEY)] {
        let answer = ask(&sluice, token, &[], "x").await;
        assert_eq!((answer.status, answer.error_type().as_str()), (401, "sluice_unauthorized"), "{token:?}");
    }
    assert_eq!(mock.arrivals(), 0, "nothing was queued or forwarded");
    let answer = ask(&sluice, Some(BATCH), &[], "x").await;
    assert_eq!(answer.status, 200);
    let seen = &mock.requests()[0];
    assert_eq!(seen.headers["authorization"], format!("Bearer {TEST_KEY}").as_str(), "the client token stays here");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_client_requests_total{client=\"batch\",outcome=\"success\"} 1"), "{metrics}");
    assert!(metrics.contains("sluice_client_requests_total{client=\"anonymous\",outcome=\"rejected\"} 3"), "{metrics}");
}

#[tokio::test]
async fn without_the_requirement_unknown_callers_are_anonymous() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let sluice = Sluice::start(with_clients(&mock, vec![client("batch", BATCH)], false)).await;
    assert_eq!(ask(&sluice, None, &[], "x").await.status, 200);
    assert_eq!(ask(&sluice, Some("sk-unknown"), &[], "x").await.status, 200);
    assert_eq!(ask(&sluice, Some(BATCH), &[], "x").await.status, 200);
    let status = status(&sluice).await;
    assert_eq!(row(&status, "anonymous")["requests"], 2, "{status}");
    assert_eq!(row(&status, "batch")["requests"], 1, "{status}");
}

/// Holds requests whose prompt says "hold" at `gate`; answers the others at once.
fn hold_some(gate: Arc<Notify>) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |request, _| {
        if request.json()["messages"][0]["content"] == "hold" {
            Reply::Stream {
                status: 200,
                content_type: "application/json",
                chunks: vec![Chunk::Gate(gate.clone()), data(r#"{"ok":true}"#)],
                ending: Ending::Complete,
            }
        } else {
            Reply::json(200, completion("at once"))
        }
    }
}

/// Opens `gate` for every held request until all have their answer.
async fn release<T>(gate: &Notify, held: &[tokio::task::JoinHandle<T>]) {
    let all_done = || held.iter().all(|h| h.is_finished());
    for _ in 0..500 {
        if all_done() {
            return;
        }
        gate.notify_waiters();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the held requests never finished");
}

#[tokio::test]
async fn a_client_at_its_cap_waits_while_another_is_served_and_cannot_pass_for_someone_else() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(hold_some(gate.clone())).await;
    let mut batch = client("batch", BATCH);
    batch.max_concurrency = Some(2);
    batch.max_priority = PriorityName::Low;
    let sluice = Arc::new(Sluice::start(with_clients(&mock, vec![batch, client("web", WEB)], false)).await);
    let held: Vec<_> = (0..4)
        .map(|n| {
            let sluice = sluice.clone();
            tokio::spawn(async move {
                // Each claims another fairness group and the highest priority: neither is granted.
                let spoof = format!("someone-else-{n}");
                ask(&sluice, Some(BATCH), &[("x-sluice-client", &spoof), ("x-sluice-priority", "high")], "hold").await
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || mock.arrivals() == 2).await);
    let mut waiting = serde_json::Value::Null;
    for _ in 0..200 {
        waiting = status(&sluice).await;
        if row(&waiting, "batch")["queued"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (row(&waiting, "batch")["queued"].as_u64(), row(&waiting, "batch")["inflight"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(waiting["queue"]["by_priority"]["low"], 2, "its priority is capped at low: {waiting}");
    let web = tokio::time::timeout(Duration::from_secs(10), ask(&sluice, Some(WEB), &[], "now")).await;
    assert_eq!(web.expect("another client is served at once").status, 200);
    assert_eq!(mock.arrivals(), 3, "batch still holds 2 and waits with 2");
    release(&gate, &held).await;
    for request in held {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert_eq!(mock.max_inflight(), 3, "batch never held more than its 2 slots");
}

#[tokio::test]
async fn a_full_share_of_the_queue_is_refused_for_that_client_alone() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(hold_some(gate.clone())).await;
    let mut batch = client("batch", BATCH);
    batch.max_concurrency = Some(1);
    batch.max_queued = Some(1);
    let sluice = Arc::new(Sluice::start(with_clients(&mock, vec![batch, client("web", WEB)], false)).await);
    let first = tokio::spawn({
        let sluice = sluice.clone();
        async move { ask(&sluice, Some(BATCH), &[], "hold").await }
    });
    assert!(eventually(Duration::from_secs(10), || mock.arrivals() == 1).await);
    let second = tokio::spawn({
        let sluice = sluice.clone();
        async move { ask(&sluice, Some(BATCH), &[], "hold").await }
    });
    for _ in 0..200 {
        if row(&status(&sluice).await, "batch")["queued"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let third = ask(&sluice, Some(BATCH), &[], "hold").await;
    assert_eq!((third.status, third.error_type().as_str()), (503, "sluice_queue_full"));
    assert!(third.text().contains("max_queued"), "{}", third.text());
    assert_eq!(ask(&sluice, Some(WEB), &[], "now").await.status, 200, "others are not refused");
    let held = [first, second];
    release(&gate, &held).await;
    for request in held {
        assert_eq!(request.await.unwrap().status, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn past_its_daily_tokens_a_client_gets_429_until_midnight() {
    // Each answer uses 5 tokens (3 prompt + 2 completion).
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let mut batch = client("batch", BATCH);
    batch.daily_tokens = Some(8);
    let sluice = Sluice::start(with_clients(&mock, vec![batch, client("web", WEB)], false)).await;
    for _ in 0..2 {
        assert_eq!(ask(&sluice, Some(BATCH), &[], "x").await.status, 200);
    }
    for _ in 0..100 {
        if row(&status(&sluice).await, "batch")["tokens_today"] == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = ask(&sluice, Some(BATCH), &[], "x").await;
    assert_eq!((refused.status, refused.error_type().as_str()), (429, "sluice_quota_exceeded"));
    assert!(refused.text().contains("daily_tokens") && refused.text().contains("10"), "{}", refused.text());
    assert_eq!(refused.header("x-should-retry"), "false", "the SDKs do not retry it before midnight");
    let retry_after: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=86_400).contains(&retry_after));
    assert_eq!(mock.arrivals(), 2, "sluice's own answer: nothing was forwarded");
    assert_eq!(ask(&sluice, Some(WEB), &[], "x").await.status, 200, "another client has its own day");
    let status = status(&sluice).await;
    assert_eq!(row(&status, "batch")["quota_used"], 1.25, "{status}");
    tokio::time::advance(Duration::from_secs(retry_after)).await;
    assert_eq!(ask(&sluice, Some(BATCH), &[], "x").await.status, 200, "a new day");
}

#[tokio::test]
async fn a_reload_adds_and_removes_clients() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let config = with_clients(&mock, vec![client("batch", BATCH)], true);
    let sluice = Sluice::start(config.clone()).await;
    assert_eq!(ask(&sluice, Some(WEB), &[], "x").await.status, 401);
    let mut next = config.clone();
    next.clients = vec![client("web", WEB)];
    sluice.proxy.reload(next).unwrap();
    assert_eq!(ask(&sluice, Some(WEB), &[], "x").await.status, 200, "added");
    assert_eq!(ask(&sluice, Some(BATCH), &[], "x").await.status, 401, "removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_days_count_survives_a_restart_of_the_binary() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let state = std::env::temp_dir().join(format!("sluice-state-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    let config = format!(
        "[server]\nstate_dir = {:?}\n\n[[clients]]\nname = \"batch\"\ntoken_sha256 = \"{}\"\ndaily_tokens = 8\n",
        state.display().to_string(),
        token_sha256(BATCH)
    );
    let bearer = format!("Bearer {BATCH}");
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let body = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"x"}]}"#;
    {
        let mut daemon = Daemon::start(&config, &mock.url()).await;
        for _ in 0..2 {
            assert_eq!(call("POST", &daemon.url("/v1/chat/completions"), &headers, body).await.status, 200);
        }
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit().await.code(), Some(0));
    }
    let saved = std::fs::read_to_string(state.join("client-tokens.json")).unwrap();
    assert!(saved.contains("\"batch\": 10"), "{saved}");
    let daemon = Daemon::start(&config, &mock.url()).await;
    let answer = call("POST", &daemon.url("/v1/chat/completions"), &headers, body).await;
    assert_eq!((answer.status, answer.error_type().as_str()), (429, "sluice_quota_exceeded"), "{}", answer.text());
    drop(daemon);
    std::fs::remove_dir_all(state).unwrap();
}
