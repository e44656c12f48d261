//! When DeepSeek can't answer: fallbacks (a silent primary, a slow first token, persistent throttling, an
//! outage and the circuit's recovery) and streams that resume instead of breaking — against two mock
//! upstreams, under tokio's paused clock where time matters.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice::config::{Config, FallbackConfig};
use support::*;
use tokio::time::Instant;

/// A config with the primary on `primary` and one fallback, "flash", on `fallback`.
fn with_fallback(primary: &Mock, fallback: &Mock) -> Config {
    let mut config = config_for(primary);
    config.fallbacks.push(FallbackConfig {
        name: "flash".into(),
        base_url: Some(fallback.url()),
        account: None,
        api_key_file: None,
        api_key_env: Some("UNUSED".into()),
        models: BTreeMap::from([("*".to_string(), "deepseek-v4-flash".to_string())]),
        key: sluice::config::ApiKey::new("sk-fallback", "test"),
    });
    config
}

fn answered_by_fallback(_: &Recorded, _: usize) -> Reply {
    Reply::json(
        200,
        serde_json::json!({"id": "fb", "object": "chat.completion", "model": "deepseek-v4-flash",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the fallback"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        .to_string(),
    )
}

async fn ask(sluice: &Sluice, body: serde_json::Value) -> Answer {
    call("POST", &sluice.url("/v1/chat/completions"), &[("content-type", "application/json")], body.to_string()).await
}

fn pro(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "deepseek-v4-pro", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(start_paused = true)]
async fn a_silent_primary_is_answered_by_the_fallback_within_the_header_timeout() {
    let primary = Mock::start(|_, _| Reply::Silence).await;
    let fallback = Mock::start(answered_by_fallback).await;
    let mut config = with_fallback(&primary, &fallback);
    config.upstream.header_timeout = Duration::from_secs(10);
    let sluice = Sluice::start(config).await;
    let started = Instant::now();
    let answer = ask(&sluice, pro(false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(started.elapsed() <= Duration::from_secs(11), "{:?}", started.elapsed());
    assert_eq!(answer.header("x-sluice-upstream"), "flash");
    assert_eq!(answer.json()["model"], "deepseek-v4-flash", "the response names the model that answered");
    let asked = &fallback.requests()[0];
    assert_eq!(asked.model(), "deepseek-v4-flash", "the fallback was asked for its model");
    assert_eq!(asked.headers["authorization"], "Bearer sk-fallback", "with its own key");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(
        metrics.contains("sluice_fallbacks_total{from=\"primary\",to=\"flash\",reason=\"header_timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_token_goes_to_the_fallback_within_the_first_token_limit() {
    let primary = Mock::start(|_, _| {
        let mut late = match canonical_stream(3, 0, None, Ending::Complete, "slow") {
            Reply::Stream { chunks, .. } => chunks,
            _ => unreachable!(),
        };
        late.insert(2, Chunk::Pause(Duration::from_secs(20))); // after the keep-alive and the role chunk
        Reply::sse(late, Ending::Complete)
    })
    .await;
    let fallback = Mock::start(|_, _| canonical_stream(3, 0, None, Ending::Complete, "fast")).await;
    let mut config = with_fallback(&primary, &fallback);
    config.fallback.first_token_timeout = Duration::from_secs(15);
    // No early head (it would go out at 15 s too, before anyone knew which upstream answers).
    config.queue.stream_keepalive = Duration::ZERO;
    let sluice = Sluice::start(config).await;
    let started = Instant::now();
    let answer = ask(&sluice, pro(true)).await;
    assert!(started.elapsed() <= Duration::from_secs(16), "{:?}", started.elapsed());
    assert_eq!(answer.header("x-sluice-upstream"), "flash");
    let text = answer.text();
    assert!(
        text.contains("\"id\":\"fast\"") && !text.contains("\"id\":\"slow\""),
        "only the fallback's stream: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(start_paused = true)]
async fn persistent_throttling_on_the_primary_goes_to_the_fallback_after_a_while() {
    let primary = Mock::start(|_, _| Reply::json(429, r#"{"error":{"message":"Rate Limit Reached"}}"#)).await;
    let fallback = Mock::start(answered_by_fallback).await;
    let mut config = with_fallback(&primary, &fallback);
    config.fallback.after = Duration::from_secs(2);
    let sluice = Sluice::start(config).await;
    let started = Instant::now();
    let answer = ask(&sluice, pro(false)).await;
    assert_eq!((answer.status, answer.header("x-sluice-upstream")), (200, "flash"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(4), "{waited:?}");
    assert!(!answer.text().contains("Rate Limit"), "never the upstream's 429");
}

#[tokio::test(start_paused = true)]
async fn an_outage_of_the_primary_is_bridged_and_the_primary_is_used_again_soon_after() {
    let down_until = Instant::now() + Duration::from_secs(60);
    let primary = Mock::start(move |_, _| {
        if Instant::now() < down_until {
            Reply::json(503, r#"{"error":{"message":"Server overloaded"}}"#)
        } else {
            Reply::json(200, completion("from the primary"))
        }
    })
    .await;
    let fallback = Mock::start(answered_by_fallback).await;
    let sluice = Arc::new(Sluice::start(with_fallback(&primary, &fallback)).await);
    let started = Instant::now();
    let mut requests = Vec::new();
    for second in 0..120u64 {
        tokio::time::sleep_until(started + Duration::from_secs(second)).await;
        let sluice = sluice.clone();
        requests.push((second, tokio::spawn(async move { ask(&sluice, pro(false)).await })));
    }
    let mut first_back = None;
    for (second, request) in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "sent at {second} s: {}", answer.text());
        let upstream = answer.header("x-sluice-upstream").to_string();
        if second >= 60 && upstream == "primary" {
            first_back.get_or_insert(second);
        }
        if second >= 90 {
            assert_eq!(upstream, "primary", "sent at {second} s, 30 s after the primary recovered");
        }
    }
    assert!(first_back.is_some_and(|s| s <= 90), "{first_back:?}");
    assert!(fallback.arrivals() >= 30, "the outage was bridged: {}", fallback.arrivals());
    assert!(sluice.proxy.metrics().render().unwrap().contains("sluice_fallbacks_total"));
}

/// The primary of the resume scenarios: 60 words, cut (or stalled) after 40; continuations answered
/// from where their prefix ends.
fn cut_at_40(ending: Ending) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |request, _| {
        let from = prefix_words(request);
        if request.path.starts_with("/beta/") {
            canonical_stream(60, from, None, Ending::Complete, "cont")
        } else {
            canonical_stream(60, 0, Some(40), ending, "orig")
        }
    }
}

/// The content of a stream's events, in order.
fn content_of(stream: &str) -> String {
    stream
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_resumed_into_one_whole_answer() {
    let primary = Mock::start(cut_at_40(Ending::Stall)).await;
    let mut config = config_for(&primary);
    config.upstream.idle_timeout = Duration::from_secs(5);
    let sluice = Sluice::start(config).await;
    let started = Instant::now();
    let answer = ask(
        &sluice,
        serde_json::json!({"model": "deepseek-v4-flash", "stream": true,
        "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "count"}]}),
    )
    .await;
    assert!(started.elapsed() <= Duration::from_secs(6), "{:?}", started.elapsed());
    let text = answer.text();
    assert_eq!(content_of(&text), canonical_text(60), "{text}");
    assert!(!text.contains("\"id\":\"cont\""), "the continuation reads as the original");
    assert_eq!(text.matches("\"role\"").count(), 1, "one role chunk");
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("error"));
    let continuation = &primary.requests()[1];
    assert_eq!(continuation.path, "/beta/chat/completions");
    let last = continuation.json()["messages"].as_array().unwrap().last().cloned().unwrap();
    assert_eq!((last["role"].as_str(), last["prefix"].as_bool()), (Some("assistant"), Some(true)));
    assert_eq!(last["content"], canonical_text(40));
    let usage: serde_json::Value = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|v| !v["usage"].is_null())
        .map(|v| v["usage"].clone())
        .unwrap();
    assert_eq!(usage["completion_tokens"], 60, "the continuation's 20 and the 40 delivered before the cut");
}

#[tokio::test]
async fn a_continuation_refused_ends_with_the_error_of_the_original_cut() {
    let primary = Mock::start(|request: &Recorded, _| {
        if request.path.starts_with("/beta/") {
            Reply::json(400, r#"{"error":{"message":"prefix completion is not supported"}}"#)
        } else {
            canonical_stream(60, 0, Some(40), Ending::Cut, "orig")
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&primary)).await;
    let answer = ask(
        &sluice,
        serde_json::json!({"model": "deepseek-v4-flash", "stream": true,
        "messages": [{"role": "user", "content": "count"}]}),
    )
    .await;
    let text = answer.text();
    assert_eq!(content_of(&text), canonical_text(40));
    let last_event = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last_event.contains("sluice_upstream_stream_error") && last_event.contains("broke"), "{last_event}");
    assert!(!last_event.contains("prefix completion"), "the refusal does not mask the cut: {last_event}");
}

#[tokio::test]
async fn no_resume_in_reasoning_or_when_turned_off() {
    let primary = Mock::start(|request: &Recorded, _| {
        if request.path.starts_with("/beta/") {
            return canonical_stream(60, prefix_words(request), None, Ending::Complete, "cont");
        }
        let thinking = r#"data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#;
        Reply::sse(vec![chunk_event("a"), data(Box::leak(format!("{thinking}\n\n").into_boxed_str()))], Ending::Cut)
    })
    .await;
    let sluice = Sluice::start(config_for(&primary)).await;
    let body = serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let answer = ask(&sluice, body.clone()).await;
    assert!(answer.text().contains("sluice_upstream_stream_error"), "cut while reasoning: not resumed");
    assert_eq!(primary.arrivals(), 1);
    let mut config = config_for(&primary);
    config.fallback.resume = false;
    let off = Sluice::start(config).await;
    let answer =
        ask(&off, serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "y"}]}))
            .await;
    assert!(answer.text().contains("sluice_upstream_stream_error"));
    assert_eq!(primary.arrivals(), 2, "resume = false: no continuation");
}

#[tokio::test(start_paused = true)]
async fn three_failures_in_a_row_go_to_the_fallback() {
    let primary = Mock::start(|_, _| Reply::json(500, r#"{"error":{"message":"internal"}}"#)).await;
    let fallback = Mock::start(answered_by_fallback).await;
    let sluice = Sluice::start(with_fallback(&primary, &fallback)).await;
    let answer = ask(&sluice, pro(false)).await;
    assert_eq!((answer.status, answer.header("x-sluice-upstream")), (200, "flash"));
    assert_eq!(primary.arrivals(), 3, "three attempts on the primary, then the fallback");
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("reason=\"failing\"} 1"), "{metrics}");
    assert!(
        metrics.contains("sluice_tokens_total{model=\"deepseek-v4-flash\",kind=\"prompt\",account=\"flash\"} 1"),
        "tokens are the answering model's and account's: {metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_primary_is_bridged_and_only_completions_fall_back() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fallback = Mock::start(answered_by_fallback).await;
    let mut config = with_fallback(&fallback, &fallback);
    config.upstream.base_url = format!("http://127.0.0.1:{closed}");
    let sluice = Sluice::start(config).await;
    let answer = ask(&sluice, pro(false)).await;
    assert_eq!((answer.status, answer.header("x-sluice-upstream")), (200, "flash"), "{}", answer.text());
    let balance = call("GET", &sluice.url("/user/balance"), &[], "").await;
    assert_eq!(balance.status, 502, "the balance is the primary's own: {}", balance.text());
    assert_eq!(balance.header("x-sluice-upstream"), "primary", "the upstream tried, also on sluice's own error");
    let refused = call("GET", &sluice.url("/not-an-api-path"), &[], "").await;
    assert_eq!(refused.header("x-sluice-upstream"), "sluice", "answered before any upstream");
}
