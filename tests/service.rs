//! The binary under a service manager: readiness notification, `sluice healthcheck`, config reload on
//! SIGHUP (applied without failing requests; an invalid file refused), and the drain on SIGTERM — each
//! against the real process, with the mock upstream in this test process.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::daemon::{free_port, Daemon};
use support::*;
use tokio::sync::Notify;

/// Debug logging shows when requests enter the queue; one slot at a time makes queueing easy to cause.
const ONE_AT_A_TIME: &str =
    "[log]\nlevel = \"info,sluice::admission=debug\"\n[limits]\nmax_concurrency = 1\n[upstream.balance]\npoll = \"0s\"\n";

fn healthcheck(addr: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["healthcheck", "--listen", addr])
        .env_remove("SLUICE_CONFIG")
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_notified_once_the_listener_accepts() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    // `start` returns once READY=1 arrived; the listener must accept at that moment, no retrying.
    let daemon = Daemon::start("", &mock.url()).await;
    assert!(std::net::TcpStream::connect(daemon.addr).is_ok(), "READY=1 came before the listener accepted");
    assert_eq!(call("GET", &daemon.url("/readyz"), &[], "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_while_every_runtime_serves() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    // WatchdogSec=2s: a ping a second while every serving runtime beats; five pings outlast the three
    // seconds of room a runtime that never beat would have.
    let env = [("WATCHDOG_USEC", "2000000"), ("TOKIO_WORKER_THREADS", "3")];
    let mut daemon = Daemon::start_with_env("", &mock.url(), &env).await;
    let mut pings = 0;
    while pings < 5 {
        let notification = daemon.next_notification().await;
        pings += usize::from(notification.contains("WATCHDOG=1"));
    }
    assert!(daemon.stderr().contains("systemd watchdog enabled"), "{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_against_sluice_and_fails_when_nothing_listens() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let daemon = Daemon::start("", &mock.url()).await;
    assert!(healthcheck(&daemon.addr.to_string()));
    assert!(!healthcheck(&format!("127.0.0.1:{}", free_port())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_limits_without_failing_a_request() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let mut daemon = Daemon::start(ONE_AT_A_TIME, &mock.url()).await;
    let url = daemon.url("/v1/chat/completions");
    let mut requests = Vec::new();
    for n in 0..3 {
        let url = url.clone();
        requests
            .push(tokio::spawn(async move { call("POST", &url, &[], format!(r#"{{"model":"m","n":{n}}}"#)).await }));
    }
    // One at the upstream (held), two queued behind max_concurrency = 1.
    assert!(daemon.wait_log("queued", 2).await, "{}", daemon.stderr());
    assert!(eventually(Duration::from_secs(20), || mock.arrivals() == 1).await, "{}", daemon.stderr());

    std::fs::write(&daemon.config_path, ONE_AT_A_TIME.replace("max_concurrency = 1", "max_concurrency = 3")).unwrap();
    daemon.signal("HUP");
    assert!(daemon.next_notification().await.contains("RELOADING=1"));
    assert!(daemon.next_notification().await.contains("READY=1"));
    // The new cap is in force: the queued two go out while the first still holds its slot.
    assert!(eventually(Duration::from_secs(20), || mock.arrivals() == 3).await, "{}", daemon.stderr());
    gate.notify_one();
    for request in requests {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert!(daemon.stderr().contains("config reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_refused_and_the_running_config_stays() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("still here"))).await;
    let mut daemon = Daemon::start(ONE_AT_A_TIME, &mock.url()).await;
    std::fs::write(&daemon.config_path, "[limits]\nmax_concurrency = 0\n").unwrap();
    daemon.signal("HUP");
    assert!(daemon.next_notification().await.contains("RELOADING=1"));
    assert!(daemon.next_notification().await.contains("READY=1"));
    assert!(daemon.wait_log("config reload refused", 1).await);
    assert!(daemon.stderr().contains("limits.max_concurrency"), "the log names the key:\n{}", daemon.stderr());
    let answer = call("POST", &daemon.url("/v1/chat/completions"), &[], r#"{"model":"m"}"#).await;
    assert_eq!(answer.status, 200);

    // A valid file whose change needs a restart is applied where it can be, and the log says so.
    std::fs::write(&daemon.config_path, format!("{ONE_AT_A_TIME}[server]\nmax_header_bytes = 16384\n")).unwrap();
    daemon.signal("HUP");
    assert!(daemon.wait_log("need a restart", 1).await, "{}", daemon.stderr());
    assert!(daemon.stderr().contains("server.max_header_bytes"));
}

/// Starts a held SSE stream (the only slot) and two requests queued behind it.
async fn stream_and_queue(
    daemon: &Daemon,
    mock: &Mock,
) -> (hyper::body::Incoming, Vec<tokio::task::JoinHandle<Answer>>) {
    let url = daemon.url("/v1/chat/completions");
    let response = send("POST", &url, &[], r#"{"model":"m","stream":true}"#).await;
    let mut stream = response.into_body();
    next_chunk(&mut stream).await.unwrap().unwrap();
    let mut queued = Vec::new();
    for _ in 0..2 {
        let url = url.clone();
        queued.push(tokio::spawn(async move { call("POST", &url, &[], r#"{"model":"m"}"#).await }));
    }
    assert!(daemon.wait_log("queued", 2).await, "{}", daemon.stderr());
    assert!(eventually(Duration::from_secs(20), || mock.arrivals() == 1).await, "{}", daemon.stderr());
    (stream, queued)
}

fn held_stream(gate: Arc<Notify>) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, index| {
        if index == 0 {
            Reply::sse(vec![chunk_event("one"), Chunk::Gate(gate.clone()), data("data: [DONE]\n\n")], Ending::Complete)
        } else {
            Reply::json(200, completion("served during the drain"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_stream_and_the_queue_then_exits_0() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(held_stream(gate.clone())).await;
    let mut daemon = Daemon::start(ONE_AT_A_TIME, &mock.url()).await;
    let (mut stream, queued) = stream_and_queue(&daemon, &mock).await;

    daemon.signal("TERM");
    assert!(daemon.next_notification().await.contains("STOPPING=1"));
    let addr = daemon.addr;
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect(addr).is_err()).await,
        "still accepting"
    );
    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"), "the stream finished");
    for request in queued {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "queued requests are served during the drain: {}", answer.text());
    }
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_streams_of_every_runtime_then_exits_0() {
    const STREAMS: usize = 16;
    let gate = Arc::new(Notify::new());
    let mock = {
        let gate = gate.clone();
        Mock::start(move |_, _| {
            Reply::sse(vec![chunk_event("one"), Chunk::Gate(gate.clone()), data("data: [DONE]\n\n")], Ending::Complete)
        })
        .await
    };
    // Four runtimes, each accepting on a socket of its own: sixteen connections land on several of them
    // (all on one: a chance of 4^-15).
    let config = "[limits]\nmax_concurrency = 64\nadaptive = false\n";
    let mut daemon = Daemon::start_with_env(config, &mock.url(), &[("TOKIO_WORKER_THREADS", "4")]).await;
    assert!(daemon.wait_log("runtimes=4", 1).await, "{}", daemon.stderr());
    let url = daemon.url("/v1/chat/completions");
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut stream = send("POST", &url, &[], r#"{"model":"m","stream":true}"#).await.into_body();
        next_chunk(&mut stream).await.unwrap().unwrap();
        streams.push(stream);
    }

    daemon.signal("TERM");
    assert!(daemon.next_notification().await.contains("STOPPING=1"));
    // Opens the gate for every stream that waits at it, until all are through.
    let opener = tokio::spawn(async move {
        loop {
            gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    for mut stream in streams {
        let mut rest = Vec::new();
        while let Some(chunk) = next_chunk(&mut stream).await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"), "a stream was cut: {rest:?}");
    }
    opener.abort();
    assert_eq!(daemon.wait_exit().await.code(), Some(0), "{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_has_sent_nothing_is_closed_at_once_on_sigterm() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    // Neither limit would close the silent connection before the test's own limit runs out.
    let config = "[server]\nshutdown_grace = \"10m\"\nheader_read_timeout = \"10m\"\n";
    let mut daemon = Daemon::start(config, &mock.url()).await;
    let mut silent = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    // Connections are accepted in order: once a later one is answered, the silent one was accepted too.
    assert_eq!(call("GET", &daemon.url("/healthz"), &[], "").await.status, 200);
    daemon.signal("TERM");
    let mut buf = [0u8; 16];
    let read =
        tokio::time::timeout(Duration::from_secs(20), tokio::io::AsyncReadExt::read(&mut silent, &mut buf)).await;
    // Closed by sluice (a FIN: the end of the stream), not reset with a listener that never accepted it.
    assert!(matches!(read, Ok(Ok(0))), "the silent connection was not closed cleanly: {read:?}");
    assert_eq!(daemon.wait_exit().await.code(), Some(0), "the drain waited for a connection with no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_period_ends_the_queue_gets_a_clear_503_and_sluice_exits_0() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(held_stream(gate)).await;
    let config = format!("{ONE_AT_A_TIME}[server]\nshutdown_grace = \"500ms\"\n");
    let mut daemon = Daemon::start(&config, &mock.url()).await;
    let (_stream, queued) = stream_and_queue(&daemon, &mock).await;
    daemon.signal("TERM");
    let turned_away = queued.len();
    for request in queued {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.error_type(), "sluice_shutting_down");
        assert!(answer.header("retry-after").parse::<u64>().is_ok());
    }
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    assert_eq!(mock.arrivals(), 1, "the queued requests never reached the upstream");
    // The log writer wrote every line it was handed before the process ended.
    let log = daemon.stderr();
    assert_eq!(log.matches("error=\"sluice_shutting_down\"").count(), turned_away, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_how_each_request_ended() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let daemon = Daemon::start(ONE_AT_A_TIME, &mock.url()).await;
    let url = daemon.url("/v1/chat/completions");
    let held = tokio::spawn({
        let url = url.clone();
        async move { call("POST", &url, &[], r#"{"model":"m"}"#).await.status }
    });
    assert!(eventually(Duration::from_secs(20), || mock.arrivals() == 1).await);
    // A client queues behind the held request, then gives up.
    let body = r#"{"model":"m"}"#;
    let request =
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut leaver = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut leaver, request.as_bytes()).await.unwrap();
    assert!(daemon.wait_log("queued", 1).await, "{}", daemon.stderr());
    drop(leaver);
    assert!(daemon.wait_log("outcome=\"cancelled\"", 1).await, "{}", daemon.stderr());
    gate.notify_one();
    assert_eq!(held.await.unwrap(), 200);
    // A whole body with a Content-Length is complete, not "client_gone".
    assert_eq!(call("GET", &daemon.url("/v1/models"), &[], "").await.status, 200);
    assert!(daemon.wait_log("end=\"complete\"", 2).await, "{}", daemon.stderr());
    assert!(!daemon.stderr().contains("end=\"client_gone\" outcome=\"success\""), "{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_in_clear_text_to_another_host_is_warned_about_at_startup() {
    let daemon = Daemon::start("", "http://192.0.2.10:8080").await;
    assert!(daemon.wait_log("travels unencrypted", 1).await, "{}", daemon.stderr());
}
