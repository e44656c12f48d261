//! Hostile peers and bad input, against sluice in-process and the mock upstream: absurd header values
//! from the upstream, connections that send nothing or too much, clients that never read, thousands of
//! idle connections, garbage request heads, an unreachable upstream, a compressing upstream, exhausted
//! rate-limit windows, a full body budget, shutdown under load, and requests abandoned while queued —
//! none of which may panic sluice, leak a slot, or leave a client without an answer.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use sluice::config::ModelLimits;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const LIMIT: Duration = Duration::from_secs(20);

fn chat_request(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_is_capped_not_a_panic() {
    let mock = Mock::start(|_, index| match index {
        0 => Reply::json(429, "{}").with_header("retry-after", "1e20"),
        1 => Reply::json(429, "{}").with_header("retry-after-ms", "-5"),
        2 => Reply::json(503, "{}").with_header("retry-after", "NaN"),
        _ => Reply::json(200, completion("ok")),
    })
    .await;
    let mut config = config_for(&mock);
    config.retry.max_delay = Duration::from_secs(30);
    let sluice = Sluice::start(config).await;
    let started = tokio::time::Instant::now();
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(started.elapsed() >= Duration::from_secs(30), "the huge Retry-After was honoured, capped");
    assert!(started.elapsed() < Duration::from_secs(120));
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_and_one_that_sends_too_slowly_too() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.server.header_read_timeout = Duration::from_millis(300);
    let sluice = Sluice::start(config).await;
    let mut silent = TcpStream::connect(sluice.addr).await.unwrap();
    let mut slow = TcpStream::connect(sluice.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost:").await.unwrap();
    let mut buf = [0u8; 64];
    for (name, stream) in [("silent", &mut silent), ("slow", &mut slow)] {
        let read = tokio::time::timeout(LIMIT, stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{name}: still open ({read:?})");
    }
    assert_eq!(chat(&sluice, "m", &[]).await.status, 200, "others are served");
}

#[tokio::test]
async fn a_request_whose_first_bytes_could_start_http2_is_still_served_as_http1() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let request = chat_request(r#"{"model":"m"}"#);
    // "P" alone could begin HTTP/2's preface (hyper-util's sniff then waits for more); "PO" cannot.
    for split in [1, 2, request.len()] {
        let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
        stream.write_all(&request.as_bytes()[..split]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(&request.as_bytes()[split..]).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "split after {split} bytes: {}", String::from_utf8_lossy(&head));
    }
}

#[tokio::test]
async fn an_http2_preface_that_arrives_in_pieces_is_still_answered_as_http2() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let empty_settings = [0u8, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();
    stream.write_all(&preface[..8]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&preface[8..]).await.unwrap();
    stream.write_all(&empty_settings).await.unwrap();
    // An HTTP/2 server's first frame is its SETTINGS (type 4); an HTTP/1 server would answer "HTTP/1.1 ...".
    let mut frame_head = [0u8; 9];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut frame_head)).await.unwrap().unwrap();
    assert_eq!(frame_head[3], 0x4, "not an HTTP/2 SETTINGS frame: {frame_head:?}");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.server.max_connections = 3;
    let sluice = Sluice::start(config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(sluice.addr).await.unwrap());
    }
    let mut over = TcpStream::connect(sluice.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(LIMIT, over.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the fourth connection was served: {read:?}");
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), async {
            let mut stream = TcpStream::connect(sluice.addr).await?;
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        })
        .await
        {
            if response.starts_with(b"HTTP/1.1 200") {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "once connections closed, new ones are served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_stream_is_cut_and_its_slot_freed() {
    let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024)));
    // The stuck client's stream is far larger than any buffer on the way; the next client's is small.
    let mock = Mock::start(move |_, index| {
        let chunks = std::iter::repeat_n(Chunk::Data(chunk.clone()), if index == 0 { 2000 } else { 2 }).collect();
        Reply::sse(chunks, Ending::Complete)
    })
    .await;
    let mut config = config_for(&mock);
    config.upstream.idle_timeout = Duration::from_millis(500);
    config.limits.models.insert("m".into(), ModelLimits { max_concurrency: 1 });
    config.limits.adaptive = false;
    let sluice = Arc::new(Sluice::start(config).await);
    let mut stuck = TcpStream::connect(sluice.addr).await.unwrap();
    stuck.write_all(chat_request(r#"{"model":"m","stream":true}"#).as_bytes()).await.unwrap();
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 1).await);
    // The client reads nothing: sluice's writes back up, and the stall limit cuts the connection.
    assert!(
        eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 0).await,
        "the slot is still held by a client that reads nothing"
    );
    let url = sluice.url("/v1/chat/completions");
    let answer = tokio::time::timeout(LIMIT, call("POST", &url, &[], r#"{"model":"m","stream":true}"#)).await.unwrap();
    assert_eq!(answer.status, 200);
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_stop_a_normal_client() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("still here"))).await;
    let sluice = Arc::new(Sluice::start(config_for(&mock)).await);
    let mut idle = Vec::new();
    for n in 0..5000 {
        match TcpStream::connect(sluice.addr).await {
            Ok(stream) => idle.push(stream),
            Err(err) => panic!("connection {n}: {err}"),
        }
    }
    // Some send half a request head and stop.
    for stream in idle.iter_mut().take(500) {
        let _ = stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHo").await;
    }
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let answer = chat(&sluice, "deepseek-v4-flash", &[]).await;
        assert_eq!(answer.json()["choices"][0]["message"]["content"], "still here");
    }
    eprintln!("20 requests beside 5,000 idle connections took {:?}", started.elapsed());
    drop(idle);
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 0).await);
}

#[tokio::test]
async fn garbage_request_heads_get_json_errors_and_sluice_keeps_serving() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let big = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let response = raw(sluice.addr, big.as_bytes(), LIMIT).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert!(response.contains("sluice_header_too_large"), "{response}");
    let response = raw(sluice.addr, b"\x00\x01garbage\r\n\r\n", LIMIT).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("\"error\""), "{response}");
    // Random heads: whatever comes back, sluice stays up and answers the next request.
    fastrand::seed(3);
    let pieces: [&[u8]; 12] = [
        b"GET ",
        b"POST ",
        b"/v1/",
        b" HTTP/1.1",
        b"\r\n",
        b"Host: x",
        b"Content-Length: 99999999999999999999",
        b"Transfer-Encoding: chunked",
        b":",
        b"\x00",
        b"\xff\xfe",
        b" ",
    ];
    for _ in 0..150 {
        let mut head = Vec::new();
        for _ in 0..fastrand::usize(1..12) {
            head.extend_from_slice(pieces[fastrand::usize(..pieces.len())]);
        }
        head.extend_from_slice(b"\r\n\r\n");
        let _ = raw(sluice.addr, &head, Duration::from_millis(300)).await;
    }
    assert_eq!(chat(&sluice, "m", &[]).await.status, 200);
}

#[tokio::test]
async fn only_api_paths_are_forwarded_and_the_favicon_is_answered_here() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let favicon = call("GET", &sluice.url("/favicon.ico"), &[], "").await;
    assert_eq!(favicon.status, 204);
    for path in ["/", "/admin", "/etc/passwd", "/v2/chat"] {
        let answer = call("GET", &sluice.url(path), &[], "").await;
        assert_eq!((answer.status, answer.error_type().as_str()), (404, "sluice_not_found"), "{path}");
    }
    assert_eq!(mock.arrivals(), 0, "nothing reached the upstream with the key");
    for path in ["/v1/models", "/models", "/beta/completions", "/user/balance"] {
        assert_eq!(call("GET", &sluice.url(path), &[], "").await.status, 200, "{path}");
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_given_up_on_after_the_unreachable_wait() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.upstream.base_url = format!("http://127.0.0.1:{port}");
    config.upstream.unreachable_wait = Duration::from_millis(500);
    config.queue.max_wait = Duration::from_secs(60);
    let sluice = Sluice::start(config).await;
    let started = std::time::Instant::now();
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.error_type(), "sluice_upstream_unreachable");
    assert!(started.elapsed() < Duration::from_secs(30), "waited {:?}, not queue.max_wait", started.elapsed());
}

#[tokio::test]
async fn the_upstream_is_asked_for_plain_bytes_and_a_compressed_stream_is_not_tampered_with() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("plain"))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    chat(&sluice, "m", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(mock.requests()[0].headers["accept-encoding"], "identity");

    // An upstream that compresses anyway, and then breaks: its bytes pass untouched, and the client
    // sees a broken body — never an error event appended to compressed bytes.
    let gzip_like = Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00");
    let mock = Mock::start(move |_, _| {
        Reply::sse(vec![Chunk::Data(gzip_like.clone())], Ending::Cut).with_header("content-encoding", "gzip")
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let response = send("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut broke = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d.as_ref())),
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    assert!(broke, "a broken compressed stream must not end like a success");
    assert_eq!(received, b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "bytes untouched, nothing appended");
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_token_window_pauses_its_lane_at_most_max_delay() {
    let mock = Mock::start(|request, _| {
        let reply = Reply::json(200, completion(&request.model()));
        if request.model() == "a" {
            reply.with_header("x-ratelimit-remaining-tokens", "0").with_header("x-ratelimit-reset-tokens", "1h")
        } else {
            reply
        }
    })
    .await;
    let mut config = config_for(&mock);
    config.retry.max_delay = Duration::from_secs(2);
    let sluice = Sluice::start(config).await;
    assert_eq!(chat(&sluice, "a", &[]).await.status, 200);
    let started = tokio::time::Instant::now();
    assert_eq!(chat(&sluice, "b", &[]).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(100), "another lane waited for a's window");
    assert_eq!(chat(&sluice, "a", &[]).await.status, 200);
    let waited = started.elapsed();
    assert!(waited <= Duration::from_secs(3), "a waited {waited:?}: an hour asked, max_delay given");
}

#[tokio::test]
async fn the_body_budget_turns_away_what_would_not_fit() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let mut config = config_for(&mock);
    config.limits.max_concurrency = 1;
    config.server.max_body_bytes = 1024;
    config.server.max_buffered_bytes = 2048;
    let sluice = Arc::new(Sluice::start(config).await);
    let body = |n: usize| format!(r#"{{"model":"m","pad":"{}"}}"#, "p".repeat(n));
    let first = tokio::spawn({
        let sluice = sluice.clone();
        async move { call("POST", &sluice.url("/v1/chat/completions"), &[], body(10)).await.status }
    });
    assert!(eventually(LIMIT, || mock.arrivals() == 1).await);
    let mut queued = Vec::new();
    for _ in 0..2 {
        let sluice = sluice.clone();
        queued.push(tokio::spawn(async move {
            call("POST", &sluice.url("/v1/chat/completions"), &[], body(900)).await.status
        }));
    }
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 2).await);
    let refused = call("POST", &sluice.url("/v1/chat/completions"), &[], body(900)).await;
    assert_eq!((refused.status, refused.error_type().as_str()), (503, "sluice_queue_full"), "{}", refused.text());
    assert!(refused.header("retry-after").parse::<u64>().is_ok());
    gate.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    for task in queued {
        assert_eq!(task.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn requests_abandoned_while_queued_are_counted_as_cancelled() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start(gated_first(gate.clone())).await;
    let mut config = config_for(&mock);
    config.limits.max_concurrency = 1;
    let sluice = Arc::new(Sluice::start(config).await);
    let first = tokio::spawn({
        let sluice = sluice.clone();
        async move { chat(&sluice, "m", &[]).await.status }
    });
    assert!(eventually(LIMIT, || mock.arrivals() == 1).await);
    let mut leaver = TcpStream::connect(sluice.addr).await.unwrap();
    leaver.write_all(chat_request(r#"{"model":"m"}"#).as_bytes()).await.unwrap();
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 1).await);
    drop(leaver);
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().queued == 0).await);
    gate.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    assert!(
        metrics.contains("sluice_requests_total{outcome=\"cancelled\",model=\"other\"} 1"),
        "no cancelled outcome in:\n{metrics}"
    );
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["totals"]["requests"]["cancelled"], 1);
}

#[tokio::test]
async fn at_the_end_of_the_grace_every_request_still_on_its_way_gets_an_answer() {
    let gate = Arc::new(Notify::new());
    let streaming_gate = gate.clone();
    let mock = Mock::start(move |request, _| match request.json()["kind"].as_str() {
        Some("stream") => Reply::sse(vec![chunk_event("Hel"), Chunk::Gate(streaming_gate.clone())], Ending::Complete),
        Some("silent") => Reply::Silence,
        _ => Reply::json(429, "{}"),
    })
    .await;
    let mut config = config_for(&mock);
    config.server.shutdown_grace = Duration::from_millis(500);
    let mut sluice = Sluice::start(config).await;
    let url = sluice.url("/v1/chat/completions");
    let mut clients = Vec::new();
    for kind in ["stream", "stream", "silent", "throttled", "throttled", "throttled"] {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "m", "kind": kind, "stream": kind == "stream"}).to_string();
            let response = send("POST", &url, &[], body).await;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
            (kind, status, bytes)
        }));
    }
    assert!(eventually(LIMIT, || mock.arrivals() >= 4).await);
    tokio::time::timeout(LIMIT, sluice.begin_shutdown()).await.unwrap().unwrap();
    for client in clients {
        let (kind, status, bytes) = client.await.unwrap();
        let bytes = bytes.unwrap_or_else(|err| panic!("{kind}: no complete answer: {err}"));
        let text = String::from_utf8_lossy(&bytes);
        match kind {
            "stream" => {
                assert_eq!(status, 200);
                assert!(text.contains("sluice_shutting_down"), "{kind}: {text}");
            }
            _ => {
                assert_eq!(status, 503, "{kind}: {text}");
                assert!(text.contains("sluice_shutting_down"), "{kind}: {text}");
            }
        }
    }
    drop(gate);
}

#[tokio::test]
async fn many_requests_waiting_for_an_unreachable_upstream_are_answered_after_the_unreachable_wait() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.upstream.base_url = format!("http://127.0.0.1:{port}");
    config.upstream.unreachable_wait = Duration::from_millis(500);
    config.retry.max_delay = Duration::from_secs(5);
    config.queue.max_wait = Duration::from_secs(120);
    let sluice = Arc::new(Sluice::start(config).await);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for n in 0..30 {
        let sluice = sluice.clone();
        tasks.push(tokio::spawn(async move { chat(&sluice, "m", &[("x-sluice-client", &format!("c{n}"))]).await }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            (answer.status, answer.error_type().as_str()),
            (502, "sluice_upstream_unreachable"),
            "{}",
            answer.text()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30), "answered after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_grants_no_window_is_cut_and_its_slot_freed() {
    let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(16 * 1024)));
    let mock = Mock::start(move |_, _| {
        let chunks = std::iter::repeat_n(Chunk::Data(chunk.clone()), 200).collect();
        Reply::sse(chunks, Ending::Complete)
    })
    .await;
    let mut config = config_for(&mock);
    config.upstream.idle_timeout = Duration::from_millis(500);
    let sluice = Arc::new(Sluice::start(config).await);
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::post(sluice.url("/v1/chat/completions"))
        .body(http_body_util::Full::new(Bytes::from_static(br#"{"model":"m","stream":true}"#)))
        .unwrap();
    let response = h2.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    // The body is never read: the client grants no window beyond the first 64 KiB.
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 1).await);
    assert!(
        eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 0).await,
        "the slot is still held by an HTTP/2 client that reads nothing"
    );
    drop(response);
}
