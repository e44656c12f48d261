//! Courtesy under throttling, end to end against the mock upstream, mostly under tokio's paused clock: a
//! throttled lane probes one request at a time with growing gaps, so the attempts a throttling upstream
//! sees stay bounded and do not grow with the number of requests waiting; Retry-After pauses the lane;
//! a deep queue meets a hidden cap with few 429s; throttling that does not depend on load does not
//! collapse the learned limit. Virtual time: tens of seconds of throttling take milliseconds.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sluice::config::{Config, ModelLimits, RetryConfig};
use support::*;
use tokio::time::Instant;

const MODEL: &str = "deepseek-v4-flash";

/// sluice on its default retry delays (1 s probe gaps up to 30 s) in front of `mock`.
fn default_delays(mock: &Mock) -> Config {
    let mut config = config_for(mock);
    config.retry = RetryConfig::default();
    config.queue.max_wait = Duration::from_secs(120);
    config
}

/// Starts `n` chat requests (each from its own client) and returns their tasks.
fn fire(sluice: &Arc<Sluice>, n: usize) -> Vec<tokio::task::JoinHandle<Answer>> {
    (0..n)
        .map(|i| {
            let sluice = sluice.clone();
            tokio::spawn(async move { chat(&sluice, MODEL, &[("x-sluice-client", &format!("c{i}"))]).await })
        })
        .collect()
}

/// Upstream attempts within `horizon` of virtual time with `waiting` requests against a wall that
/// answers `status` to everything.
async fn attempts_against_a_wall(status: u16, waiting: usize, horizon: Duration) -> usize {
    let mock = Mock::start(move |_, _| Reply::json(status, r#"{"error":{"message":"busy"}}"#)).await;
    let sluice = Arc::new(Sluice::start(default_delays(&mock)).await);
    let start = Instant::now();
    let tasks = fire(&sluice, waiting);
    tokio::time::sleep_until(start + horizon).await;
    let arrivals = mock.requests().iter().filter(|r| r.arrived <= start + horizon).count();
    for task in tasks {
        task.abort();
    }
    arrivals
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_against_a_throttling_upstream_makes_few_attempts() {
    for status in [429, 503] {
        let first_3s = attempts_against_a_wall(status, 1, Duration::from_secs(3)).await;
        let in_40s = attempts_against_a_wall(status, 1, Duration::from_secs(40)).await;
        assert!(first_3s <= 4, "{status}: {first_3s} attempts in the first 3 s");
        assert!(in_40s <= 6, "{status}: {in_40s} attempts in 40 s");
        assert!(in_40s >= 4, "{status}: it kept probing ({in_40s})");
    }
}

#[tokio::test(start_paused = true)]
async fn attempts_do_not_grow_with_the_number_waiting() {
    let alone = attempts_against_a_wall(429, 1, Duration::from_secs(12)).await;
    for waiting in [10, 50, 100] {
        let attempts = attempts_against_a_wall(429, waiting, Duration::from_secs(12)).await;
        assert!(attempts <= 2 * alone + 4, "{waiting} waiting: {attempts} attempts (alone: {alone})");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_pauses_the_lane_not_just_the_request() {
    let mock = Mock::start(|request, index| {
        if index == 0 {
            Reply::json(429, "{}").with_header("retry-after", "5")
        } else {
            Reply::json(200, completion(&request.model()))
        }
    })
    .await;
    let sluice = Arc::new(Sluice::start(default_delays(&mock)).await);
    let start = Instant::now();
    let first = fire(&sluice, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A second request of the same lane waits out the pause too; another model's lane does not.
    let second = fire(&sluice, 1);
    let other = chat(&sluice, "deepseek-v4-pro", &[]).await;
    assert_eq!(other.status, 200);
    assert!(start.elapsed() < Duration::from_secs(1), "another lane is not paused");
    for task in first.into_iter().chain(second) {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let same_lane: Vec<_> = mock.requests().into_iter().filter(|r| r.model() == MODEL).collect();
    assert_eq!(same_lane.len(), 3);
    for later in &same_lane[1..] {
        assert!(later.arrived - start >= Duration::from_secs(5), "sent {:?} into the pause", later.arrived - start);
    }
}

/// The queue is deep, the cap hidden, and the share of attempts the upstream throttles stays small (under
/// the paused clock, so this machine's speed plays no part). The time against the ideal is measured in the
/// lane's simulation (`admission/lane/tests.rs`) and the benchmark.
#[tokio::test(start_paused = true)]
async fn a_deep_queue_meets_a_hidden_cap_with_few_429s() {
    const CAP: usize = 8;
    const REQUESTS: usize = 320;
    let mock = Mock::start_capped(Some(CAP), |_, _| Reply::Stream {
        status: 200,
        content_type: "application/json",
        chunks: vec![Chunk::Pause(Duration::from_millis(20)), data(r#"{"ok":true}"#)],
        ending: Ending::Complete,
    })
    .await;
    let mut config = default_delays(&mock);
    config.queue.max_depth = 10_000;
    let sluice = Arc::new(Sluice::start(config).await);
    for task in fire(&sluice, REQUESTS) {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let share = mock.over_cap() as f64 / mock.arrivals() as f64;
    assert_eq!(mock.arrivals() - mock.over_cap(), REQUESTS, "each request reached the upstream once");
    // Learning the cap costs about twenty 429s in all, whatever the depth (1.4 % of 1,500 requests in the
    // benchmark's cold start); over 320 requests that is about 6 %.
    assert!(share <= 0.08, "429 share {:.3} ({} of {})", share, mock.over_cap(), mock.arrivals());
}

#[tokio::test(start_paused = true)]
async fn random_throttling_does_not_collapse_the_limit() {
    // 30 % of requests get 429 whatever the load; 50 concurrent streams of 2 s after a warm-up round,
    // adaptive against fixed limits.
    async fn round_trip(adaptive: bool) -> Duration {
        fastrand::seed(11);
        let mock = Mock::start(|_, _| {
            if fastrand::f64() < 0.3 {
                Reply::json(429, r#"{"error":{"message":"Rate Limit Reached"}}"#)
            } else {
                Reply::sse(
                    vec![chunk_event("a"), Chunk::Pause(Duration::from_secs(2)), data("data: [DONE]\n\n")],
                    Ending::Complete,
                )
            }
        })
        .await;
        let mut config = default_delays(&mock);
        config.limits.adaptive = adaptive;
        config.limits.models.insert(MODEL.into(), ModelLimits { max_concurrency: 500 });
        let sluice = Arc::new(Sluice::start(config).await);
        let mut took = Duration::ZERO;
        for _ in 0..2 {
            let start = Instant::now();
            for task in fire(&sluice, 50) {
                let answer = task.await.unwrap();
                assert_eq!(answer.status, 200, "{}", answer.text());
            }
            took = start.elapsed();
        }
        took
    }
    let learned = round_trip(true).await;
    let fixed = round_trip(false).await;
    assert!(learned.as_secs_f64() <= 1.5 * fixed.as_secs_f64(), "adaptive {learned:?} against fixed limits {fixed:?}");
}
