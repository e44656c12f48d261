//! Unit tests of the admission stage under tokio's paused clock: no sockets, no wall-clock sleeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::ModelLimits;

fn admission(global: u32, models: &[(&str, u32)], max_depth: usize) -> Admission {
    let limits = LimitsConfig {
        max_concurrency: global,
        models: models
            .iter()
            .map(|(name, cap)| (name.to_string(), ModelLimits { max_concurrency: *cap }))
            .collect::<BTreeMap<_, _>>(),
        aliases: BTreeMap::from([("alias".to_string(), "m".to_string())]),
        ..LimitsConfig::default()
    };
    let queue = QueueConfig { max_depth, max_wait: Duration::from_secs(60), ..QueueConfig::default() };
    Admission::new(&limits, &queue, &RetryConfig::default(), vec![])
}

fn ticket(model: &str, client: ClientId) -> Ticket<'_> {
    Ticket {
        model: Some(model),
        pool: None,
        client,
        priority: Priority::Normal,
        deadline: Instant::now() + Duration::from_secs(60),
        retry: false,
        entry: None,
    }
}

/// Lets spawned tasks (the dispatcher, the waiters) run until they block.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn uncontended_requests_pass_at_once_and_permits_return() {
    let admission = admission(10, &[("m", 2)], 100);
    let a = admission.acquire(ticket("m", 1)).await.unwrap();
    let b = admission.acquire(ticket("alias", 1)).await.unwrap();
    assert_eq!(b.model(), "m", "aliases share the model's lane");
    assert_eq!(b.account(), DEFAULT_ACCOUNT);
    assert_eq!(admission.snapshot().inflight, 2);
    drop((a, b));
    assert_eq!(admission.snapshot().inflight, 0);
}

#[tokio::test(start_paused = true)]
async fn per_model_cap_holds_and_a_release_admits_the_next() {
    let admission = admission(10, &[("m", 2)], 100);
    let mut tasks = Vec::new();
    for client in 0..5 {
        let admission = admission.clone();
        tasks.push(tokio::spawn(async move { admission.acquire(ticket("m", client)).await }));
    }
    settle().await;
    let snapshot = admission.snapshot();
    assert_eq!((snapshot.inflight, snapshot.queued), (2, 3));
    // Another model is not blocked by m's cap.
    let other = admission.acquire(ticket("other", 9)).await.unwrap();
    assert_eq!(other.model(), "other");

    let mut permits = Vec::new();
    for task in tasks.iter_mut().filter(|t| t.is_finished()) {
        permits.push(task.await.unwrap().unwrap());
    }
    assert_eq!(permits.len(), 2);
    permits.pop();
    settle().await;
    assert_eq!(admission.snapshot().queued, 2, "one waiter took the released slot");
    assert_eq!(admission.snapshot().inflight, 3);
}

#[tokio::test(start_paused = true)]
async fn global_cap_holds_across_models() {
    let admission = admission(2, &[], 100);
    let _a = admission.acquire(ticket("x", 1)).await.unwrap();
    let _b = admission.acquire(ticket("y", 1)).await.unwrap();
    let waiting = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("z", 1)).await }
    });
    settle().await;
    assert!(!waiting.is_finished());
    assert_eq!(admission.snapshot().queued, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_rejects_at_once() {
    let admission = admission(1, &[], 2);
    let _held = admission.acquire(ticket("m", 1)).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let admission = admission.clone();
        waiting.push(tokio::spawn(async move { admission.acquire(ticket("m", 1)).await }));
    }
    settle().await;
    let rejected = admission.acquire(ticket("m", 1)).await.unwrap_err();
    assert!(matches!(rejected, Rejected::QueueFull { depth: 2, retry_after: 1 }), "{rejected:?}");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_the_wait() {
    let admission = admission(1, &[], 10);
    let _held = admission.acquire(ticket("m", 1)).await.unwrap();
    let started = Instant::now();
    let mut waiting = ticket("m", 2);
    waiting.deadline = started + Duration::from_secs(5);
    let rejected = admission.acquire(waiting).await.unwrap_err();
    assert!(matches!(rejected, Rejected::DeadlineExceeded { .. }), "{rejected:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(5), "paused clock: exactly the deadline");
    assert_eq!(admission.snapshot().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_goes_away_leaves_the_queue_and_takes_no_slot() {
    let admission = admission(1, &[], 10);
    let held = admission.acquire(ticket("m", 1)).await.unwrap();
    let gone = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("m", 2)).await }
    });
    settle().await;
    assert_eq!(admission.snapshot().queued, 1);
    gone.abort();
    settle().await;
    assert_eq!(admission.snapshot().queued, 0);
    drop(held);
    settle().await;
    assert_eq!(admission.snapshot().inflight, 0, "no slot went to the departed waiter");
    let _next = admission.acquire(ticket("m", 3)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_dispatcher_wakes_per_dispatch_not_per_waiter() {
    const WAITERS: usize = 1000;
    let admission = admission(1, &[], WAITERS + 1);
    let first = admission.acquire(ticket("m", 0)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for client in 0..WAITERS as u64 {
        let admission = admission.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(permit) = admission.acquire(ticket("m", client % 7)).await {
                let _ = tx.send(permit);
            }
        });
    }
    settle().await;
    assert_eq!(admission.snapshot().queued, WAITERS);
    // Let a lot of (virtual) time pass with everyone waiting: an idle queue costs no wake-ups.
    let before_idle = admission.snapshot().dispatcher_wakeups;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(admission.snapshot().dispatcher_wakeups, before_idle, "waiting costs no wake-ups");

    let before = admission.snapshot().dispatcher_wakeups;
    drop(first);
    for _ in 0..WAITERS {
        let permit = rx.recv().await.unwrap();
        drop(permit);
    }
    let wakeups = admission.snapshot().dispatcher_wakeups - before;
    assert!(wakeups <= 2 * WAITERS as u64 + 10, "{wakeups} wake-ups for {WAITERS} dispatches");
    assert_eq!(admission.snapshot().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_pauses_the_lane_not_the_others() {
    let admission = admission(10, &[], 10);
    let mut throttled = admission.acquire(ticket("m", 1)).await.unwrap();
    throttled.report(Signal::Throttled { retry_after: Some(Duration::from_secs(3)) });
    drop(throttled);
    assert_eq!(admission.snapshot().probing_lanes(), 1);
    let started = Instant::now();
    let _other = admission.acquire(ticket("other-model", 1)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "another model's lane is not paused");
    let _same = admission.acquire(ticket("m", 1)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(3), "the lane waits out the Retry-After");
}

#[tokio::test(start_paused = true)]
async fn a_throttle_lowers_the_lanes_limit_to_what_the_upstream_holds() {
    let admission = admission(100, &[("m", 50)], 100);
    let mut held = Vec::new();
    for client in 0..INITIAL_LIMIT as u64 {
        held.push(admission.acquire(ticket("m", client)).await.unwrap());
    }
    held[0].report(Signal::Throttled { retry_after: None });
    let lane = |admission: &Admission| admission.snapshot().lanes.into_iter().find(|l| l.name == "m").unwrap();
    assert_eq!(lane(&admission).limit, Some(INITIAL_LIMIT - 1), "the others in flight");
    assert_eq!(lane(&admission).configured, Some(50));
    assert!(!lane(&admission).probing, "others are in flight: the lower limit is the slowdown");
    // A lane at its learned limit queues newcomers even though the configured cap is far away.
    held.remove(0);
    let waiting = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("m", 99)).await }
    });
    settle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished());
    held.pop();
    settle().await;
    assert!(waiting.is_finished(), "a freed slot under the learned limit admits the next");
}

#[tokio::test(start_paused = true)]
async fn with_adaptive_off_only_the_configured_cap_holds_and_a_throttle_starts_probing() {
    let limits = LimitsConfig {
        adaptive: false,
        models: BTreeMap::from([("m".to_string(), ModelLimits { max_concurrency: 50 })]),
        ..LimitsConfig::default()
    };
    let admission = Admission::new(&limits, &QueueConfig::default(), &RetryConfig::default(), vec![]);
    let mut permit = admission.acquire(ticket("m", 1)).await.unwrap();
    let _other = admission.acquire(ticket("m", 2)).await.unwrap();
    permit.report(Signal::Throttled { retry_after: None });
    let lane = admission.snapshot().lanes.into_iter().find(|l| l.name == "m").unwrap();
    assert_eq!(lane.limit, Some(50));
    assert!(lane.probing, "without a learned limit, the gate is the slowdown");
}

/// Upstream attempts (dispatches) a throttling lane makes in `horizon` with `waiting` requests queued,
/// each attempt throttled at once and its request queued again (as the proxy does).
async fn attempts_against_a_wall(waiting: usize, horizon: Duration) -> usize {
    let admission = admission(4096, &[("m", 2500)], waiting + 10);
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    for client in 0..waiting as u64 {
        let (admission, attempts) = (admission.clone(), attempts.clone());
        tokio::spawn(async move {
            let mut retry = false;
            loop {
                let mut t = ticket("m", client);
                t.retry = retry;
                t.deadline = start + horizon;
                let Ok(mut permit) = admission.acquire(t).await else { return };
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await; // the 429's round trip
                permit.report(Signal::Throttled { retry_after: None });
                retry = true;
            }
        });
    }
    tokio::time::sleep(horizon).await;
    attempts.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_against_a_wall_makes_few_attempts() {
    assert!(attempts_against_a_wall(1, Duration::from_secs(3)).await <= 4);
    assert!(attempts_against_a_wall(1, Duration::from_secs(40)).await <= 6);
}

#[tokio::test(start_paused = true)]
async fn attempts_against_a_wall_do_not_grow_with_the_queue() {
    let alone = attempts_against_a_wall(1, Duration::from_secs(12)).await;
    assert!(alone >= 3, "it did retry: {alone}");
    for waiting in [10, 100, 1000] {
        let attempts = attempts_against_a_wall(waiting, Duration::from_secs(12)).await;
        assert!(attempts <= 2 * alone + 4, "{waiting} waiting: {attempts} attempts, alone {alone}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_dispatcher_answers_the_queue_and_comes_back() {
    let admission = admission(1, &[], 10);
    let held = admission.acquire(ticket("m", 1)).await.unwrap();
    let waiting = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("m", 2)).await }
    });
    settle().await;
    admission.inject_dispatcher_panic();
    settle().await;
    assert_eq!(waiting.await.unwrap().unwrap_err(), Rejected::Internal, "answered, not left waiting");
    assert_eq!(admission.snapshot().dispatcher_restarts, 1);
    drop(held);
    let next = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("m", 3)).await.map(drop) }
    });
    settle().await;
    assert!(next.await.unwrap().is_ok(), "the restarted dispatcher serves again");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_enforces_its_own_deadline() {
    let admission = admission(1, &[], 10);
    let _held = admission.acquire(ticket("m", 1)).await.unwrap();
    let mut t = ticket("m", 2);
    t.deadline = Instant::now() + Duration::from_secs(5);
    // Even with the dispatcher asleep forever, the wait ends shortly after the deadline.
    let outcome = tokio::time::timeout(Duration::from_secs(10), admission.acquire(t)).await;
    assert!(matches!(outcome, Ok(Err(Rejected::DeadlineExceeded { .. }))), "{outcome:?}");
}

#[tokio::test(start_paused = true)]
async fn retries_go_ahead_of_their_clients_newer_requests() {
    let admission = admission(1, &[], 10);
    let held = admission.acquire(ticket("m", 1)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (name, retry) in [("new-1", false), ("new-2", false), ("retry", true)] {
        let admission = admission.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut t = ticket("m", 1);
            t.retry = retry;
            let permit = admission.acquire(t).await;
            let _ = tx.send((name, permit));
        });
        settle().await;
    }
    drop(held);
    let mut order = Vec::new();
    for _ in 0..3 {
        let (name, permit) = rx.recv().await.unwrap();
        order.push(name);
        drop(permit);
    }
    assert_eq!(order, vec!["retry", "new-1", "new-2"]);
}

#[tokio::test(start_paused = true)]
async fn unreadable_models_share_the_unknown_lane() {
    let admission = admission(10, &[], 10);
    let permit = admission.acquire(Ticket { model: None, ..ticket("", 1) }).await.unwrap();
    assert_eq!(permit.model(), UNKNOWN_MODEL);
    let long = "x".repeat(500);
    let permit = admission.acquire(ticket(&long, 1)).await.unwrap();
    assert_eq!(permit.model(), UNKNOWN_MODEL);
}

#[tokio::test(start_paused = true)]
async fn closing_rejects_waiters_and_newcomers() {
    let admission = admission(1, &[], 10);
    let _held = admission.acquire(ticket("m", 1)).await.unwrap();
    let waiting = tokio::spawn({
        let admission = admission.clone();
        async move { admission.acquire(ticket("m", 2)).await }
    });
    settle().await;
    admission.close();
    assert_eq!(waiting.await.unwrap().unwrap_err(), Rejected::ShuttingDown);
    assert_eq!(admission.acquire(ticket("m", 3)).await.unwrap_err(), Rejected::ShuttingDown);
}

#[tokio::test(start_paused = true)]
async fn learned_limits_and_lanes_outlive_idleness() {
    let admission = admission(100, &[("m", 50)], 100);
    let mut held = Vec::new();
    for client in 0..4 {
        held.push(admission.acquire(ticket("m", client)).await.unwrap());
    }
    held[0].report(Signal::Throttled { retry_after: None });
    drop(held);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let lane = admission.snapshot().lanes.into_iter().find(|l| l.name == "m").unwrap();
    assert_eq!(lane.limit, Some(3), "kept while idle");
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_model_names_shares_one_route_without_harm() {
    let admission = admission(1, &[], 2000);
    let _held = admission.acquire(ticket("m", 1)).await.unwrap();
    let mut waiting = Vec::new();
    for n in 0..300 {
        let admission = admission.clone();
        waiting.push(tokio::spawn(async move { admission.acquire(ticket(&format!("model-{n}"), n)).await.map(drop) }));
    }
    settle().await;
    let snapshot = admission.snapshot();
    assert_eq!(snapshot.queued, 300, "every request queued, none lost");
    assert!(snapshot.lanes.iter().any(|l| l.name == OTHER_MODEL), "past the bound, models share `other`");
    assert!(snapshot.lanes.len() <= 300);
}

#[tokio::test(start_paused = true)]
async fn with_a_rate_limit_every_route_gets_its_turn() {
    let limits = LimitsConfig { rate: Some("10/s".parse().unwrap()), burst: Some(1), ..LimitsConfig::default() };
    let queue = QueueConfig { max_depth: 100, max_wait: Duration::from_secs(60), ..QueueConfig::default() };
    let admission = Admission::new(&limits, &queue, &RetryConfig::default(), vec![]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for model in ["a", "b", "c", "d"] {
        for n in 0..5 {
            let (admission, tx) = (admission.clone(), tx.clone());
            tokio::spawn(async move {
                if admission.acquire(ticket(model, n)).await.is_ok() {
                    let _ = tx.send(model);
                }
            });
        }
    }
    let mut first_eight = Vec::new();
    for _ in 0..8 {
        first_eight.push(rx.recv().await.unwrap());
    }
    for model in ["a", "b", "c", "d"] {
        assert!(first_eight.contains(&model), "{model} starved: {first_eight:?}");
    }
}
