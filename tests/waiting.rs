//! Waiting well: a streaming request that waits gets its head early and keep-alive comments, then the
//! upstream's events — or one in-band error event; `/status` says who waits. Under tokio's paused clock.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

/// sluice with `rate` and keep-alive comments every `keepalive`.
fn rated(mock: &Mock, rate: &str, keepalive: u64) -> sluice::config::Config {
    let mut config = config_for(mock);
    config.limits.rate = Some(rate.parse().unwrap());
    config.limits.burst = Some(1);
    config.queue.max_wait = Duration::from_secs(300);
    config.queue.stream_keepalive = Duration::from_secs(keepalive);
    config
}

fn hello() -> Reply {
    Reply::sse(
        vec![data(": keep-alive\n\n"), chunk_event("Hello"), chunk_event(", world"), data("data: [DONE]\n\n")],
        Ending::Complete,
    )
}

fn stream_request() -> String {
    r#"{"model":"deepseek-v4-flash","stream":true,"messages":[{"role":"user","content":"hi"}]}"#.to_string()
}

async fn ask_stream(sluice: &Sluice) -> Answer {
    call("POST", &sluice.url("/v1/chat/completions"), &[("content-type", "application/json")], stream_request()).await
}

/// The SSE comments of sluice's queue in `text`.
fn queue_comments(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with(": sluice queued") || l.starts_with(": sluice waiting")).collect()
}

#[tokio::test(start_paused = true)]
async fn a_stream_queued_behind_the_rate_gets_comments_then_the_whole_stream() {
    let mock = Mock::start(|_, _| hello()).await;
    let sluice = Sluice::start(rated(&mock, "1/min", 10)).await;
    let first = ask_stream(&sluice).await;
    assert_eq!(first.header("x-sluice-queued"), "", "an answer within the interval has no early head");
    let started = tokio::time::Instant::now();
    let answer = ask_stream(&sluice).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(40), "it waited for the rate: {waited:?}");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-sluice-queued"), "true");
    assert_eq!(answer.header("content-type"), "text/event-stream");
    assert_eq!(answer.header("cache-control"), "no-cache");
    let text = answer.text();
    let comments = queue_comments(&text);
    assert!(comments.len() >= 3, "a comment every 10 s: {text}");
    assert!(comments[0].starts_with(": sluice queued position=1 waited=10s"), "{text}");
    assert!(!text.contains("data: \n") && !text.contains("data:\n"), "no blank data lines: {text}");
    let upstream_part = &text[text.find(": keep-alive").expect("the upstream's own comment follows")..];
    assert_eq!(
        upstream_part,
        String::from_utf8_lossy(
            &[
                b": keep-alive\n\n".as_slice(),
                &chunk_bytes(chunk_event("Hello")),
                &chunk_bytes(chunk_event(", world")),
                b"data: [DONE]\n\n",
            ]
            .concat()
        ),
        "then the upstream's stream, byte for byte"
    );
    assert_eq!(mock.arrivals(), 2);
    // A request that is not a stream gets no early head: it waits for its answer as before.
    let plain = chat(&sluice, "deepseek-v4-flash", &[]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("x-sluice-queued"), "");
}

fn chunk_bytes(chunk: Chunk) -> Vec<u8> {
    match chunk {
        Chunk::Data(bytes) => bytes.to_vec(),
        _ => unreachable!(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_head_is_one_error_event_with_the_upstreams_status_and_message() {
    let mock = Mock::start(|_, index| match index {
        0 => hello(),
        1 => Reply::json(429, r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error"}}"#),
        _ => Reply::json(
            400,
            r#"{"error":{"message":"Invalid max_tokens value","type":"invalid_request_error","code":"invalid_value"}}"#,
        ),
    })
    .await;
    let sluice = Sluice::start(rated(&mock, "1/min", 10)).await;
    ask_stream(&sluice).await;
    let answer = ask_stream(&sluice).await;
    assert_eq!(answer.status, 200, "the head went out while it waited");
    let text = answer.text();
    assert!(!queue_comments(&text).is_empty(), "{text}");
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.len(), 1, "one error event, nothing else: {text}");
    let error: serde_json::Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["message"], "Invalid max_tokens value");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["status"], 400);
    assert!(text.ends_with("\n\n"), "a whole event: {text}");
    assert_eq!(mock.arrivals(), 3, "the 429 was retried underneath");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.lines().any(|l| l.starts_with("sluice_requests_total{") && l.contains("outcome=\"client_error\"")));
}

#[tokio::test(start_paused = true)]
async fn sluices_own_failure_after_the_head_is_an_error_event_too() {
    let mock = Mock::start(|_, _| hello()).await;
    let mut config = rated(&mock, "1/min", 10);
    config.queue.max_wait = Duration::from_secs(30);
    let sluice = Sluice::start(config).await;
    ask_stream(&sluice).await;
    let answer = ask_stream(&sluice).await;
    assert_eq!(answer.status, 200);
    let text = answer.text();
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.len(), 1, "{text}");
    let error: serde_json::Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["type"], "sluice_deadline_exceeded", "{error}");
    assert_eq!(error["error"]["status"], 503);
    assert_eq!(mock.arrivals(), 1, "the deadline passed before its turn");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_after_the_head_takes_its_request_out_of_the_queue() {
    let mock = Mock::start(|_, _| hello()).await;
    let sluice = Sluice::start(rated(&mock, "1/min", 5)).await;
    ask_stream(&sluice).await;
    let response =
        send("POST", &sluice.url("/v1/chat/completions"), &[("content-type", "application/json")], stream_request())
            .await;
    assert_eq!(response.headers()["x-sluice-queued"], "true");
    let mut body = response.into_body();
    let first = next_chunk(&mut body).await.unwrap().unwrap();
    assert!(first.starts_with(b": sluice queued position=1"), "{first:?}");
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["queue"]["depth"], 1);
    drop(body);
    let sluice_ref = &sluice;
    let mut left = false;
    for _ in 0..100 {
        let status = call("GET", &sluice_ref.url("/status"), &[], "").await.json();
        if status["queue"]["depth"] == 0 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left, "the queue let the request go");
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(mock.arrivals(), 1, "nothing was sent for it");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.lines().any(|l| l.starts_with("sluice_requests_total{") && l.contains("outcome=\"cancelled\"")));
}

#[tokio::test(start_paused = true)]
async fn status_lists_who_waits_by_client_and_priority() {
    let mock = Mock::start(|_, _| hello()).await;
    let sluice = Sluice::start(rated(&mock, "1/min", 0)).await;
    chat(&sluice, "deepseek-v4-flash", &[]).await;
    let waiting: Vec<_> = [("high", "a"), ("low", "b"), ("low", "c")]
        .into_iter()
        .map(|(priority, _)| {
            let url = sluice.url("/v1/chat/completions");
            tokio::spawn(async move {
                let body = r#"{"model":"deepseek-v4-flash","messages":[]}"#;
                call("POST", &url, &[("x-sluice-priority", priority)], body).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    let clients = status["clients"].as_array().unwrap();
    let anonymous = clients.iter().find(|c| c["name"] == "anonymous").unwrap();
    assert_eq!(anonymous["queued"], 3, "{anonymous}");
    assert_eq!(anonymous["queued_by_priority"]["high"], 1, "{anonymous}");
    assert_eq!(anonymous["queued_by_priority"]["low"], 2, "{anonymous}");
    let oldest = anonymous["oldest_wait_seconds"].as_f64().unwrap();
    assert!((19.0..=21.0).contains(&oldest), "{anonymous}");
    for request in waiting {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    let anonymous = status["clients"].as_array().unwrap().iter().find(|c| c["name"] == "anonymous").unwrap().clone();
    assert_eq!(anonymous["queued"], 0);
    assert!(anonymous["oldest_wait_seconds"].is_null(), "{anonymous}");
}

#[tokio::test(start_paused = true)]
async fn the_head_goes_out_once_and_the_body_is_read_whole() {
    // Belt and braces for the relay: a stream that answers while comments flow is delivered whole.
    let mock = Mock::start(|_, _| hello()).await;
    let sluice = Sluice::start(rated(&mock, "1/30s", 7)).await;
    ask_stream(&sluice).await;
    let response =
        send("POST", &sluice.url("/v1/chat/completions"), &[("content-type", "application/json")], stream_request())
            .await;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(queue_comments(&text).len(), 4, "at 7, 14, 21 and 28 s: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}
