//! The response cache and request coalescing against the mock upstream: what is eligible, the
//! `x-sluice-cache` answers, streams replayed as their events, what is never stored, and identical
//! requests in flight sharing one upstream call.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use sluice::config::Config;
use support::*;
use tokio::sync::Notify;

fn cached(mock: &Mock) -> Config {
    let mut config = config_for(mock);
    config.cache.enabled = true;
    config
}

const DETERMINISTIC: &str =
    r#"{"model":"deepseek-v4-flash","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;

async fn post(sluice: &Sluice, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    call("POST", &sluice.url("/v1/chat/completions"), &all, body.to_string()).await
}

/// Answers `completion("answer N")`, N counting the mock's arrivals.
fn numbered(_: &Recorded, index: usize) -> Reply {
    Reply::json(200, completion(&format!("answer {index}")))
}

#[tokio::test]
async fn a_repeated_request_is_answered_from_the_cache_whatever_its_key_order_and_spacing() {
    let mock = Mock::start(numbered).await;
    let sluice = Sluice::start(cached(&mock)).await;
    let first = post(&sluice, DETERMINISTIC, &[]).await;
    assert_eq!((first.status, first.header("x-sluice-cache")), (200, "miss"));
    let reordered = "{ \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ],\n  \"temperature\": 0,\n  \"model\": \"deepseek-v4-flash\" }";
    let second = post(&sluice, reordered, &[]).await;
    assert_eq!((second.status, second.header("x-sluice-cache")), (200, "hit"));
    assert_eq!(second.body, first.body, "the same answer, byte for byte");
    assert!(second.header("age").parse::<u64>().is_ok(), "a hit says how old it is");
    assert_eq!((first.header("x-sluice-upstream"), second.header("x-sluice-upstream")), ("primary", "cache"));
    assert!(second.header("x-sluice-attempts").is_empty(), "a hit makes no upstream attempt");
    assert_eq!(mock.arrivals(), 1, "the upstream was called once");
    let other = post(&sluice, &DETERMINISTIC.replace("hi", "ho"), &[]).await;
    assert_eq!(other.header("x-sluice-cache"), "miss", "another prompt is another entry");
    assert_eq!(mock.arrivals(), 2);

    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains("sluice_cache_requests_total{result=\"hit\"} 1"), "{metrics}");
    assert!(metrics.contains("sluice_cache_requests_total{result=\"miss\"} 2"), "{metrics}");
    assert!(metrics.contains("sluice_cache_tokens_saved_total{kind=\"completion\"} 2"), "{metrics}");
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["cache"]["requests"]["hit"], 1, "{status}");
    assert_eq!(status["cache"]["entries"], 2, "{status}");
}

#[tokio::test]
async fn sampled_requests_bypass_unless_asked_and_clients_can_skip_or_refresh() {
    let mock = Mock::start(numbered).await;
    let sluice = Sluice::start(cached(&mock)).await;
    let sampled = DETERMINISTIC.replace("\"temperature\":0", "\"temperature\":0.7");
    for _ in 0..2 {
        assert_eq!(post(&sluice, &sampled, &[]).await.header("x-sluice-cache"), "bypass");
    }
    assert_eq!(mock.arrivals(), 2, "a sampled answer is meant to differ: each goes upstream");
    assert_eq!(post(&sluice, &sampled, &[("x-sluice-cache", "use")]).await.header("x-sluice-cache"), "miss");
    assert_eq!(post(&sluice, &sampled, &[("x-sluice-cache", "use")]).await.header("x-sluice-cache"), "hit");
    assert_eq!(mock.arrivals(), 3);

    let first = post(&sluice, DETERMINISTIC, &[]).await;
    assert_eq!(first.json()["choices"][0]["message"]["content"], "answer 3");
    let skipped = post(&sluice, DETERMINISTIC, &[("x-sluice-cache", "skip")]).await;
    assert_eq!((skipped.header("x-sluice-cache"), mock.arrivals()), ("bypass", 5));
    let refreshed = post(&sluice, DETERMINISTIC, &[("x-sluice-cache", "refresh")]).await;
    assert_eq!(refreshed.header("x-sluice-cache"), "miss");
    assert_eq!(refreshed.json()["choices"][0]["message"]["content"], "answer 5");
    let after = post(&sluice, DETERMINISTIC, &[]).await;
    assert_eq!(after.header("x-sluice-cache"), "hit");
    assert_eq!(after.json()["choices"][0]["message"]["content"], "answer 5", "refresh overwrote the entry");
    assert_eq!(mock.arrivals(), 6);
    assert!(
        mock.requests().iter().all(|r| r.headers.get("x-sluice-cache").is_none()),
        "x-sluice-* headers are sluice's own"
    );
}

#[tokio::test]
async fn the_model_list_is_cached_and_other_paths_are_not() {
    let mock = Mock::start(|_, _| Reply::json(200, r#"{"object":"list","data":[{"id":"deepseek-v4-flash"}]}"#)).await;
    let sluice = Sluice::start(cached(&mock)).await;
    assert_eq!(call("GET", &sluice.url("/v1/models"), &[], "").await.header("x-sluice-cache"), "miss");
    assert_eq!(call("GET", &sluice.url("/v1/models"), &[], "").await.header("x-sluice-cache"), "hit");
    assert_eq!(call("GET", &sluice.url("/user/balance"), &[], "").await.header("x-sluice-cache"), "bypass");
    assert_eq!(mock.arrivals(), 2);
}

#[tokio::test]
async fn without_the_cache_nothing_changes() {
    let mock = Mock::start(numbered).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    for _ in 0..2 {
        assert_eq!(post(&sluice, DETERMINISTIC, &[]).await.header("x-sluice-cache"), "");
    }
    assert_eq!(mock.arrivals(), 2);
}

/// A DeepSeek-like stream: a keep-alive, reasoning, content, the usage chunk, `[DONE]`.
fn reasoning_stream(ending: Ending) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, _| {
        let mut chunks = vec![
            data(": keep-alive\n\n"),
            data("data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Let me think.\"}}]}\n\n"),
            chunk_event("Hello"),
        ];
        if ending == Ending::Complete {
            chunks.extend([
                chunk_event(", world"),
                data("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9}}\n\n"),
                data("data: [DONE]\n\n"),
            ]);
        }
        Reply::sse(chunks, ending)
    }
}

fn streamed(body: &str) -> String {
    body.replacen('{', "{\"stream\":true,", 1)
}

#[tokio::test]
async fn a_stream_is_stored_as_its_events_and_replayed_whole() {
    let mock = Mock::start(reasoning_stream(Ending::Complete)).await;
    let sluice = Sluice::start(cached(&mock)).await;
    let first = post(&sluice, &streamed(DETERMINISTIC), &[]).await;
    assert_eq!(first.header("x-sluice-cache"), "miss");
    assert!(first.text().starts_with(": keep-alive\n\n"), "a miss passes through untouched");
    let replay = post(&sluice, &streamed(DETERMINISTIC), &[]).await;
    assert_eq!(replay.header("x-sluice-cache"), "hit");
    assert!(replay.header("content-type").starts_with("text/event-stream"));
    let events: Vec<&str> = first.text().leak().split("\n\n").filter(|e| e.starts_with("data:")).collect();
    let replayed: Vec<&str> = replay.text().leak().split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(replayed, events, "every data event, in order, and nothing else");
    assert_eq!(mock.arrivals(), 1);
    let plain = post(&sluice, DETERMINISTIC, &[]).await;
    assert_eq!(plain.header("x-sluice-cache"), "miss", "a non-streaming request has its own key");
}

#[tokio::test]
async fn a_cut_stream_or_an_error_is_never_stored() {
    let mock = Mock::start(reasoning_stream(Ending::Cut)).await;
    let mut config = cached(&mock);
    config.fallback.resume = false; // nothing rescues the stream
    let sluice = Sluice::start(config).await;
    for _ in 0..2 {
        let answer = post(&sluice, &streamed(DETERMINISTIC), &[]).await;
        assert_eq!(answer.header("x-sluice-cache"), "miss");
        assert!(answer.text().contains("sluice_upstream_stream_error"), "{}", answer.text());
    }
    assert_eq!(mock.arrivals(), 2, "the cut stream was not stored");

    let mock =
        Mock::start(|_, _| Reply::json(400, r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#)).await;
    let sluice = Sluice::start(cached(&mock)).await;
    for _ in 0..2 {
        assert_eq!(post(&sluice, DETERMINISTIC, &[]).await.status, 400);
    }
    assert_eq!(mock.arrivals(), 2, "an error is not an answer to keep");
}

/// Answers one gated stream: headers at once, the body when the test opens `gate`.
fn gated_stream(gate: Arc<Notify>) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, _| {
        Reply::sse(
            vec![chunk_event("Hello"), Chunk::Gate(gate.clone()), chunk_event(", world"), data("data: [DONE]\n\n")],
            Ending::Complete,
        )
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_identical_requests_in_flight_make_one_upstream_call() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_stream(gate.clone())).await;
    let sluice = Arc::new(Sluice::start(cached(&mock)).await);
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let sluice = sluice.clone();
            tokio::spawn(async move { post(&sluice, &streamed(DETERMINISTIC), &[]).await })
        })
        .collect();
    let cache = sluice.proxy.metrics().cache.clone();
    wait_for("every request to join", || cache.totals().0.iter().map(|(_, n)| n).sum::<u64>() == 100).await;
    gate.notify_one();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    assert_eq!(mock.arrivals(), 1, "one upstream call for all of them");
    let first = &answers[0].body;
    assert!(answers.iter().all(|a| a.status == 200 && a.body == *first), "100 identical answers");
    assert!(String::from_utf8_lossy(first).ends_with("data: [DONE]\n\n"));
    let coalesced = answers.iter().filter(|a| a.header("x-sluice-cache") == "coalesced").count();
    let missed = answers.iter().filter(|a| a.header("x-sluice-cache") == "miss").count();
    assert_eq!((missed, coalesced), (1, 99));
    assert_eq!(post(&sluice, &streamed(DETERMINISTIC), &[]).await.header("x-sluice-cache"), "hit");
}

#[tokio::test]
async fn the_call_goes_on_when_the_first_client_leaves_and_ends_when_the_last_does() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_stream(gate.clone())).await;
    let sluice = Sluice::start(cached(&mock)).await;
    let json = [("content-type", "application/json")];
    let url = sluice.url("/v1/chat/completions");
    let mut first = send("POST", &url, &json, streamed(DETERMINISTIC)).await;
    assert_eq!(first.headers()["x-sluice-cache"], "miss");
    let hello = first.body_mut().frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&hello).contains("Hello"));
    let second = send("POST", &url, &json, streamed(DETERMINISTIC)).await;
    assert_eq!(second.headers()["x-sluice-cache"], "coalesced");
    drop(first); // the client that started the call leaves
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.notify_one();
    let body = second.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("data: ") && text.contains("Hello") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!((mock.arrivals(), mock.cancelled()), (1, 0), "the call went on for the one left");

    // Every member gone: the call is aborted and its upstream request cancelled.
    let later = DETERMINISTIC.replace("hi", "later");
    let third = send("POST", &url, &json, streamed(&later)).await;
    let fourth = send("POST", &url, &json, streamed(&later)).await;
    assert_eq!(fourth.headers()["x-sluice-cache"], "coalesced");
    drop((third, fourth));
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.notify_one(); // the mock notices a closed connection when it next writes
    assert!(mock.wait_cancelled(1, Duration::from_secs(10)).await, "the upstream request was cancelled");
    assert_eq!(sluice.proxy.metrics().cache.memory().0, 1, "nothing was stored from the abandoned call");
}

#[tokio::test(start_paused = true)]
async fn a_call_that_fails_gives_every_member_the_same_error() {
    let mock = Mock::start(|_, _| Reply::json(429, r#"{"error":{"message":"Rate Limit Reached"}}"#)).await;
    let mut config = cached(&mock);
    config.queue.max_wait = Duration::from_secs(3);
    let sluice = Arc::new(Sluice::start(config).await);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let sluice = sluice.clone();
            tokio::spawn(async move { post(&sluice, DETERMINISTIC, &[]).await })
        })
        .collect();
    let mut results = Vec::new();
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!((answer.status, answer.error_type().as_str()), (503, "sluice_deadline_exceeded"));
        results.push(answer.header("x-sluice-cache").to_string());
    }
    results.sort();
    assert_eq!(results, ["coalesced", "coalesced", "coalesced", "coalesced", "miss"], "one call for all five");
}

#[tokio::test]
async fn with_the_queue_full_a_hit_is_still_served() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(move |request: &Recorded, _| {
        if request.json()["messages"][0]["content"] == "hold" {
            Reply::Stream {
                status: 200,
                content_type: "application/json",
                chunks: vec![Chunk::Gate(gate.clone()), data("{}")],
                ending: Ending::Complete,
            }
        } else {
            Reply::json(200, completion("kept"))
        }
    })
    .await;
    let mut config = cached(&mock);
    config.limits.max_concurrency = 1;
    config.queue.max_depth = 1;
    let sluice = Arc::new(Sluice::start(config).await);
    assert_eq!(post(&sluice, DETERMINISTIC, &[]).await.header("x-sluice-cache"), "miss");
    let hold = DETERMINISTIC.replace("hi", "hold").replace("\"temperature\":0", "\"temperature\":1");
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let (sluice, hold) = (sluice.clone(), hold.clone());
            tokio::spawn(async move { post(&sluice, &hold, &[]).await })
        })
        .collect();
    wait_for("the queue to fill", || sluice.proxy.admission().full().is_some()).await;
    let miss = post(&sluice, &DETERMINISTIC.replace("hi", "new"), &[]).await;
    assert_eq!((miss.status, miss.error_type().as_str()), (503, "sluice_queue_full"), "a miss needs a place");
    let hit = post(&sluice, DETERMINISTIC, &[]).await;
    assert_eq!((hit.status, hit.header("x-sluice-cache")), (200, "hit"), "a hit needs none");
    drop(holders);
}

#[tokio::test]
async fn a_json_body_is_shared_too() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let sluice = Arc::new(Sluice::start(cached(&mock)).await);
    let requests: Vec<_> = (0..2)
        .map(|_| {
            let sluice = sluice.clone();
            tokio::spawn(async move { post(&sluice, DETERMINISTIC, &[]).await })
        })
        .collect();
    let cache = sluice.proxy.metrics().cache.clone();
    wait_for("both to join", || cache.totals().0.iter().map(|(_, n)| n).sum::<u64>() == 2).await;
    gate.notify_one();
    let mut results = Vec::new();
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!((answer.status, answer.text().as_str()), (200, "{}"));
        results.push(answer.header("x-sluice-cache").to_string());
    }
    results.sort();
    assert_eq!(results, ["coalesced", "miss"]);
    assert_eq!(mock.arrivals(), 1);
}
