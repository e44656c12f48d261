//! End-to-end tests: the official `openai` Python SDK as the client, sluice in-process, the mock as the
//! upstream. The interpreter is `$SLUICE_TEST_PYTHON`, else `.venv/bin/python` (made by `scripts/test`);
//! a missing SDK fails these tests rather than skipping them.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::*;

fn python() -> PathBuf {
    std::env::var_os("SLUICE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// Runs one scenario of `tests/e2e/sdk_client.py` against `sluice` and asserts it passed.
async fn run_sdk(sluice: &Sluice, scenario: &str) {
    let python = python();
    assert!(
        python.exists(),
        "{} not found: run scripts/test (it creates .venv with the openai SDK) or set SLUICE_TEST_PYTHON",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/sdk_client.py");
    let base_url = sluice.url("/v1");
    let scenario = scenario.to_string();
    let output =
        tokio::task::spawn_blocking(move || Command::new(python).arg(script).arg(base_url).arg(scenario).output())
            .await
            .unwrap()
            .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stdout.trim() == "ok", "SDK scenario failed:\n{stdout}\n{stderr}");
}

fn hello_stream(ending: Ending) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, _| {
        let mut chunks = vec![data(": keep-alive\n\n"), chunk_event("Hello")];
        if ending == Ending::Complete {
            chunks.extend([chunk_event(", world"), data("data: [DONE]\n\n")]);
        }
        Reply::sse(chunks, ending)
    }
}

#[tokio::test]
async fn sdk_chat_completion() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hello from the mock"))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    run_sdk(&sluice, "chat").await;
    let seen = &mock.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], format!("Bearer {TEST_KEY}").as_str());
}

#[tokio::test]
async fn sdk_streamed_chat_completion() {
    let mock = Mock::start(hello_stream(Ending::Complete)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    run_sdk(&sluice, "stream").await;
}

#[tokio::test]
async fn sdk_raises_on_a_stream_cut_mid_way() {
    let mock = Mock::start(hello_stream(Ending::Cut)).await;
    let sluice = Sluice::start(without_resume(&mock)).await;
    run_sdk(&sluice, "stream_error").await;
}

#[tokio::test]
async fn sdk_raises_sluices_error_wherever_the_stream_is_cut() {
    let full = match chunk_event(", wörld") {
        Chunk::Data(bytes) => bytes,
        _ => unreachable!(),
    };
    let accent = full.iter().position(|&b| b == 0xc3).unwrap();
    let line_end = full.iter().position(|&b| b == b'\n').unwrap();
    // Mid-line, mid-UTF-8, and after the data line but before the blank line that ends the event.
    for cut in [12, accent + 1, line_end + 1] {
        let partial = full.slice(..cut);
        let mock = Mock::start(move |_, _| {
            Reply::sse(vec![data(": keep-alive\n\n"), chunk_event("Hello"), Chunk::Data(partial.clone())], Ending::Cut)
        })
        .await;
        let sluice = Sluice::start(without_resume(&mock)).await;
        run_sdk(&sluice, "stream_error").await;
    }
}

/// The cut scenarios where nothing can rescue the stream (resume is off): the SDK must raise.
fn without_resume(mock: &Mock) -> sluice::config::Config {
    let mut config = config_for(mock);
    config.fallback.resume = false;
    config
}

#[tokio::test]
async fn sdk_receives_the_whole_answer_when_a_stream_cut_after_40_of_60_chunks_is_resumed() {
    let mock = Mock::start(|request: &Recorded, _| {
        if request.path.starts_with("/beta/") {
            canonical_stream(60, prefix_words(request), None, Ending::Complete, "cont")
        } else {
            canonical_stream(60, 0, Some(40), Ending::Cut, "orig")
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    run_sdk(&sluice, "resumed").await;
    assert_eq!(mock.arrivals(), 2, "the original and one continuation");
}

#[tokio::test]
async fn sdk_never_sees_the_upstreams_429s() {
    let mock = Mock::start(|_, index| {
        if index < 3 {
            Reply::json(429, r#"{"error":{"message":"Rate Limit Reached"}}"#)
        } else {
            Reply::json(200, completion("hello from the mock"))
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    run_sdk(&sluice, "absorbed_429").await;
    assert_eq!(mock.arrivals(), 4);
}

#[tokio::test]
async fn sdk_parses_a_replayed_stream_into_the_original_content() {
    let mock = Mock::start(|_, _| {
        Reply::sse(
            vec![
                data(": keep-alive\n\n"),
                data("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"deepseek-v4-flash\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"reasoning_content\":\"Let me think.\"},\"finish_reason\":null}]}\n\n"),
                chunk_event("Hello"),
                chunk_event(", world"),
                data("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"deepseek-v4-flash\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9,\"total_tokens\":13}}\n\n"),
                data("data: [DONE]\n\n"),
            ],
            Ending::Complete,
        )
    })
    .await;
    let mut config = config_for(&mock);
    config.cache.enabled = true;
    let sluice = Sluice::start(config).await;
    run_sdk(&sluice, "cache_replay").await;
    assert_eq!(mock.arrivals(), 1, "the second stream came from the cache");
}

/// sluice with one request a `period` and keep-alive comments every second; the token is spent by a
/// first request, so the scenario's stream waits about `period`.
async fn queued(mock: &Mock, period: &str) -> Sluice {
    let mut config = config_for(mock);
    config.limits.rate = Some(format!("1/{period}").parse().unwrap());
    config.limits.burst = Some(1);
    config.queue.stream_keepalive = Duration::from_secs(1);
    let sluice = Sluice::start(config).await;
    assert_eq!(chat(&sluice, "deepseek-v4-flash", &[]).await.status, 200);
    sluice
}

#[tokio::test]
async fn sdk_reads_a_stream_that_waited_in_the_queue_past_its_keepalive_comments() {
    let mock = Mock::start(hello_stream(Ending::Complete)).await;
    let sluice = queued(&mock, "3s").await;
    run_sdk(&sluice, "queued_stream").await;
    assert_eq!(mock.arrivals(), 2);
}

#[tokio::test]
async fn sdk_raises_the_upstreams_400_that_came_after_the_early_head() {
    let mock = Mock::start(|_, index| match index {
        0 => Reply::json(200, completion("first")),
        1 => Reply::json(429, r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error"}}"#),
        _ => Reply::json(
            400,
            r#"{"error":{"message":"Invalid max_tokens value","type":"invalid_request_error","code":"invalid_value"}}"#,
        ),
    })
    .await;
    let sluice = queued(&mock, "3s").await;
    run_sdk(&sluice, "queued_stream_error").await;
    assert_eq!(mock.arrivals(), 3, "the 429 was retried underneath");
}
