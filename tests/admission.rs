//! Integration tests of admission and transparent retry against the mock upstream: 429s absorbed,
//! a hidden concurrency cap absorbed, the GCRA bound, per-model caps held for a stream's whole life,
//! Retry-After honoured, non-retryable statuses passed through, fairness across clients, the queue's
//! bounds and deadlines, and departed clients never reaching the upstream.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::config::{ModelLimits, Rate};
use support::*;
use tokio::sync::Notify;

const LIMIT: Duration = Duration::from_secs(20);

fn rate_limited(k: usize) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, index| {
        if index < k {
            Reply::json(429, r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error"}}"#)
        } else {
            Reply::json(200, completion("finally"))
        }
    }
}

#[tokio::test]
async fn upstream_429s_are_retried_until_success() {
    const K: usize = 4;
    let mock = Mock::start(rate_limited(K)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = chat(&sluice, "deepseek-v4-flash", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "finally");
    assert_eq!(mock.arrivals(), K + 1);
    assert_eq!(answer.header("x-sluice-attempts"), (K + 1).to_string());
    assert!(answer.header("x-sluice-queue-ms").parse::<u64>().is_ok());
}

#[tokio::test]
async fn transient_5xx_are_retried_too() {
    let mock = Mock::start(|_, index| match index {
        0 => Reply::json(500, "{}"),
        1 => Reply::json(502, "{}"),
        2 => Reply::json(503, "{}"),
        3 => Reply::json(504, "{}"),
        _ => Reply::json(200, completion("ok")),
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-sluice-attempts"), "5");
}

#[tokio::test]
async fn client_errors_are_passed_through_and_never_retried() {
    for status in [400u16, 401, 402, 404, 422] {
        let mock = Mock::start(move |_, _| Reply::json(status, r#"{"error":{"message":"upstream says no"}}"#)).await;
        let sluice = Sluice::start(config_for(&mock)).await;
        let answer = chat(&sluice, "m", &[]).await;
        assert_eq!(answer.status, status);
        assert_eq!(answer.json()["error"]["message"], "upstream says no", "the upstream's body, unchanged");
        assert_eq!(mock.arrivals(), 1, "{status} was retried");
    }
}

#[tokio::test]
async fn a_hidden_concurrency_cap_is_absorbed() {
    const CAP: usize = 3;
    let mock = Mock::start_capped(Some(CAP), |_, _| Reply::Stream {
        status: 200,
        content_type: "application/json",
        chunks: vec![Chunk::Pause(Duration::from_millis(30)), data(r#"{"ok":true}"#)],
        ending: Ending::Complete,
    })
    .await;
    let sluice = Arc::new(Sluice::start(config_for(&mock)).await);
    let mut tasks = Vec::new();
    for client in 0..10 * CAP {
        let sluice = sluice.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("client-{}", client % 4);
            chat(&sluice, "deepseek-v4-pro", &[("x-sluice-client", &name)]).await
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert!(mock.over_cap() > 0, "the test must actually hit the hidden cap");
    assert_eq!(mock.arrivals() - mock.over_cap(), 10 * CAP, "each request succeeded exactly once");
}

#[tokio::test]
async fn the_rate_limit_holds_the_gcra_bound() {
    const RATE: f64 = 20.0;
    const BURST: usize = 3;
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.limits.rate = Some(Rate { count: 20, period: Duration::from_secs(1) });
    config.limits.burst = Some(BURST as u32);
    let sluice = Arc::new(Sluice::start(config).await);
    let mut tasks = Vec::new();
    for _ in 0..25 {
        let sluice = sluice.clone();
        tasks.push(tokio::spawn(async move { chat(&sluice, "m", &[]).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let arrivals: Vec<_> = mock.requests().iter().map(|r| r.arrived).collect();
    assert_eq!(arrivals.len(), 25);
    let first = arrivals[0];
    for (n, at) in arrivals.iter().enumerate() {
        let allowed = BURST as f64 + RATE * at.duration_since(first).as_secs_f64();
        // One request of slack: arrival times are taken at the mock, a little after the limiter's decision.
        assert!((n + 1) as f64 <= allowed + 1.0, "arrival {} at {:?}: bound {allowed:.2}", n + 1, *at - first);
    }
}

#[tokio::test]
async fn a_models_cap_is_held_until_its_streams_end() {
    const CAP: usize = 2;
    let gate = Arc::new(Notify::new());
    let script = vec![chunk_event("x"), Chunk::Gate(gate.clone()), data("data: [DONE]\n\n")];
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), Ending::Complete)).await;
    let mut config = config_for(&mock);
    config.limits.models.insert("deepseek-v4-pro".into(), ModelLimits { max_concurrency: CAP as u32 });
    let sluice = Arc::new(Sluice::start(config).await);
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..3 * CAP {
        let (sluice, done) = (sluice.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let body = r#"{"model":"deepseek-v4-pro","stream":true}"#;
            let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], body).await;
            done.fetch_add(1, Ordering::SeqCst);
            answer
        }));
    }
    // Two streams open and held at the gate; the rest wait in sluice's queue, not at the upstream.
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 2 * CAP).await);
    assert!(eventually(LIMIT, || mock.arrivals() == CAP).await, "{} arrived", mock.arrivals());
    // Open the gates one stream at a time: every finished stream lets exactly one more in.
    while done.load(Ordering::SeqCst) < 3 * CAP {
        gate.notify_one();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(answer.text().ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(mock.max_inflight_for("deepseek-v4-pro"), CAP);
    assert_eq!(mock.arrivals(), 3 * CAP);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let mock = Mock::start(|_, index| {
        if index == 0 {
            Reply::json(429, "{}").with_header("retry-after", "1")
        } else {
            Reply::json(200, completion("ok"))
        }
    })
    .await;
    let mut config = config_for(&mock);
    config.retry.max_delay = Duration::from_secs(5);
    let sluice = Sluice::start(config).await;
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 200);
    let requests = mock.requests();
    let gap = requests[1].arrived - requests[0].arrived;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}, before the upstream's Retry-After");
}

/// sluice with one upstream slot (`max_concurrency = 1`) in front of a mock that holds the first
/// request's response at `gate`: whatever comes next waits in sluice's queue until the gate opens.
async fn one_slot_held_at_a_gate(adjust: impl FnOnce(&mut sluice::config::Config)) -> (Arc<Notify>, Mock, Arc<Sluice>) {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let mut config = config_for(&mock);
    config.limits.max_concurrency = 1;
    adjust(&mut config);
    let sluice = Arc::new(Sluice::start(config).await);
    (gate, mock, sluice)
}

#[tokio::test]
async fn a_small_client_is_not_starved_by_a_flooding_one() {
    let (gate, mock, sluice) = one_slot_held_at_a_gate(|_| {}).await;
    let send_as = |client: &'static str, n: usize| {
        let sluice = sluice.clone();
        tokio::spawn(async move {
            let body = serde_json::json!({"model": "m", "user": format!("{client}-{n}")}).to_string();
            call("POST", &sluice.url("/v1/chat/completions"), &[("x-sluice-client", client)], body).await.status
        })
    };
    let mut tasks = vec![send_as("A", 0)];
    assert!(eventually(LIMIT, || mock.arrivals() == 1).await);
    for n in 1..200 {
        tasks.push(send_as("A", n));
    }
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 199).await);
    for n in 0..5 {
        tasks.push(send_as("B", n));
    }
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 204).await);
    gate.notify_one();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let order: Vec<String> = mock.requests().iter().map(|r| r.json()["user"].as_str().unwrap().to_string()).collect();
    let b_positions: Vec<usize> =
        order.iter().enumerate().filter(|(_, u)| u.starts_with("B-")).map(|(i, _)| i).collect();
    assert_eq!(b_positions.len(), 5);
    assert!(b_positions.iter().all(|&i| i <= 11), "B dispatched at {b_positions:?}");
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once() {
    let (gate, _mock, sluice) = one_slot_held_at_a_gate(|config| config.queue.max_depth = 2).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let sluice = sluice.clone();
        held.push(tokio::spawn(async move { chat(&sluice, "m", &[]).await.status }));
    }
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 2).await);
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_type(), "sluice_queue_full");
    assert!(answer.header("retry-after").parse::<u64>().unwrap() >= 1);
    gate.notify_one();
    let statuses: Vec<u16> = futures_join(held).await;
    assert_eq!(statuses, vec![200, 200, 200]);
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test]
async fn the_deadline_ends_waiting_with_503_naming_the_last_status() {
    let mock = Mock::start(|_, _| Reply::json(429, "{}")).await;
    let mut config = config_for(&mock);
    config.queue.max_wait = Duration::from_millis(600);
    let sluice = Sluice::start(config).await;
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.error_type(), "sluice_deadline_exceeded");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("429"), "{}", answer.text());
    assert!(answer.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert!(mock.arrivals() >= 2, "it did retry");
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_never_reaches_the_upstream() {
    let (gate, mock, sluice) = one_slot_held_at_a_gate(|_| {}).await;
    let first = tokio::spawn({
        let sluice = sluice.clone();
        async move { chat(&sluice, "m", &[]).await.status }
    });
    assert!(eventually(LIMIT, || mock.arrivals() == 1).await);
    // A raw client queues a request, then hangs up.
    let body = r#"{"model":"m"}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await.unwrap();
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 1).await);
    drop(stream);
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 0).await, "still queued");
    gate.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(chat(&sluice, "m", &[]).await.status, 200, "the slot was not leaked");
    assert_eq!(mock.arrivals(), 2, "the departed request reached the upstream");
}

#[tokio::test]
async fn invalid_json_is_forwarded_under_the_global_limits() {
    let mock = Mock::start(|_, _| Reply::json(400, r#"{"error":{"message":"bad json"}}"#)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], "{not json").await;
    assert_eq!(answer.status, 400);
    assert_eq!(mock.requests()[0].body.as_ref(), b"{not json");
}
