//! Integration tests of the forwarding path (no limits in play): round trips, header hygiene, key
//! handling, body limits, open-proxy refusal, streaming as it arrives, broken streams, client
//! disconnects and graceful shutdown — sluice in-process against the mock upstream on 127.0.0.1.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::sync::Notify;

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn non_streaming_round_trip_keeps_status_headers_and_body() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hello")).with_header("x-upstream-extra", "1")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = chat(&sluice, "deepseek-v4-flash", &[("x-request-id", "req-42")]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "hello");
    assert_eq!(answer.header("x-upstream-extra"), "1");
    assert_eq!(answer.header("x-ds-trace-id"), "mock-trace");
    assert_eq!(answer.header("x-request-id"), "req-42", "the client's request id is kept");
    assert_eq!(answer.header("x-sluice-attempts"), "1");

    let seen = &mock.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.model(), "deepseek-v4-flash");
    assert_eq!(seen.headers["x-request-id"], "req-42");
    assert_eq!(seen.headers["host"], mock.addr.to_string().as_str(), "Host names the upstream");
}

#[tokio::test]
async fn a_request_id_is_made_when_the_client_sends_none() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("x"))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = chat(&sluice, "m", &[]).await;
    let id = answer.header("x-request-id").to_string();
    assert!(id.starts_with("sluice-"), "{id}");
    assert_eq!(mock.requests()[0].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn the_configured_key_replaces_the_clients() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("x"))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    chat(&sluice, "m", &[("authorization", "Bearer client-dummy-key")]).await;
    let auth = mock.requests()[0].headers["authorization"].to_str().unwrap().to_string();
    assert_eq!(auth, format!("Bearer {TEST_KEY}"));
}

#[tokio::test]
async fn without_a_configured_key_the_clients_key_passes_through() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("x"))).await;
    let mut config = config_for(&mock);
    config.upstream.api_key = None;
    let sluice = Sluice::start(config).await;
    chat(&sluice, "m", &[("authorization", "Bearer sk-clients-own")]).await;
    assert_eq!(mock.requests()[0].headers["authorization"], "Bearer sk-clients-own");
}

#[tokio::test]
async fn hop_by_hop_and_sluice_headers_are_not_forwarded() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("x"))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let body = r#"{"model":"m"}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic abc\r\nX-Sluice-Priority: high\r\n\
         X-Sluice-Client: app\r\nX-End-To-End: kept\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        sluice.addr,
        body.len()
    );
    let response = raw(sluice.addr, request.as_bytes(), LIMIT).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let headers = &mock.requests()[0].headers;
    for gone in ["x-hop", "keep-alive", "te", "proxy-authorization", "x-sluice-priority", "x-sluice-client"] {
        assert!(!headers.contains_key(gone), "{gone} was forwarded");
    }
    assert!(!headers.contains_key("connection"), "Connection was forwarded");
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn every_path_and_query_is_forwarded() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    for (method, path) in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/chat/completions"),
        ("POST", "/beta/completions"),
        ("GET", "/models"),
        ("GET", "/v1/models?limit=2&after=x"),
        ("GET", "/user/balance"),
    ] {
        let answer = call(method, &sluice.url(path), &[], "").await;
        assert_eq!(answer.status, 200, "{method} {path}");
    }
    let paths: Vec<String> = mock.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    assert_eq!(
        paths,
        vec![
            "POST /v1/chat/completions",
            "POST /chat/completions",
            "POST /beta/completions",
            "GET /models",
            "GET /v1/models?limit=2&after=x",
            "GET /user/balance"
        ]
    );
}

#[tokio::test]
async fn reserved_endpoints_are_answered_by_sluice() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    assert_eq!(call("GET", &sluice.url("/healthz"), &[], "").await.status, 200);
    let ready = call("GET", &sluice.url("/readyz"), &[], "").await;
    assert_eq!((ready.status, ready.json()["status"].as_str()), (200, Some("ready")));
    assert_eq!(mock.arrivals(), 0);
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_the_upstream() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.server.max_body_bytes = 1024;
    let sluice = Sluice::start(config).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], vec![b'x'; 4096]).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.error_type(), "sluice_body_too_large");
    // Chunked, without a Content-Length: the limit is enforced while reading.
    let chunk = "x".repeat(800);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    let response = raw(sluice.addr, request.as_bytes(), LIMIT).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("sluice_body_too_large"), "{response}");
    // Exactly at the limit is fine.
    assert_eq!(call("POST", &sluice.url("/v1/x"), &[], vec![b'x'; 1024]).await.status, 200);
    assert_eq!(mock.arrivals(), 1);
}

#[tokio::test]
async fn open_proxy_attempts_are_refused() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let absolute =
        raw(sluice.addr, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", LIMIT)
            .await;
    assert!(absolute.starts_with("HTTP/1.1 400"), "{absolute}");
    assert!(absolute.contains("sluice_bad_request"), "{absolute}");
    let connect = raw(
        sluice.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
        LIMIT,
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    let sneaky = call("GET", &sluice.url("//example.com/steal"), &[], "").await;
    assert_eq!(sneaky.status, 404, "not an API path: never forwarded");
    assert_eq!(sneaky.error_type(), "sluice_not_found");
    let inside = call("GET", &sluice.url("/v1//example.com/steal"), &[], "").await;
    assert_eq!(inside.status, 200, "a double slash inside an API path is just a path on the upstream");
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.requests()[0].path, "/v1//example.com/steal");
}

#[tokio::test]
async fn sse_passes_through_byte_for_byte_including_keep_alives() {
    let script = vec![
        data(": keep-alive\n\n"),
        data("\n"),
        chunk_event("Hel"),
        data(": keep-alive\n\n"),
        chunk_event("lo"),
        data("data: [DONE]\n\n"),
    ];
    let expected: Vec<u8> = script
        .iter()
        .flat_map(|c| match c {
            Chunk::Data(d) => d.to_vec(),
            _ => vec![],
        })
        .collect();
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), Ending::Complete)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "text/event-stream");
    assert_eq!(answer.body.as_ref(), expected.as_slice());
}

#[tokio::test]
async fn streaming_is_incremental() {
    let gate = Arc::new(Notify::new());
    let script = vec![chunk_event("first"), Chunk::Gate(gate.clone()), chunk_event("last"), data("data: [DONE]\n\n")];
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), Ending::Complete)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let response = send("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    let mut body = response.into_body();
    // The mock cannot send "last" before the gate opens, and the gate opens only after "first" arrived.
    let first = tokio::time::timeout(LIMIT, next_chunk(&mut body)).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("first"));
    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("last") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

async fn broken_stream(ending: Ending, idle: Duration) -> String {
    let script = vec![chunk_event("partial")];
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), ending)).await;
    let mut config = config_for(&mock);
    config.upstream.idle_timeout = idle;
    let sluice = Sluice::start(config).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    assert_eq!(answer.status, 200);
    answer.text()
}

fn assert_ends_with_error_event(text: &str) {
    assert!(text.contains("partial"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let json: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(json["error"]["type"], "sluice_upstream_stream_error", "{text}");
    assert!(text.ends_with("\n\n"));
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event() {
    let text = broken_stream(Ending::Cut, Duration::from_secs(60)).await;
    assert_ends_with_error_event(&text);
    assert!(text.contains("broke"), "{text}");
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event() {
    let text = broken_stream(Ending::Stall, Duration::from_millis(300)).await;
    assert_ends_with_error_event(&text);
    assert!(text.contains("stalled"), "{text}");
}

#[tokio::test]
async fn a_cut_json_body_is_retried_never_delivered_short() {
    let mock = Mock::start(|_, index| {
        if index == 0 {
            Reply::Stream {
                status: 200,
                content_type: "application/json",
                chunks: vec![data("{\"choices\": [")],
                ending: Ending::Cut,
            }
        } else {
            Reply::json(200, completion("whole"))
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m"}"#).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "whole", "{}", answer.text());
    assert_eq!(mock.arrivals(), 2, "the cut body was retried");
    assert_eq!(answer.header("x-sluice-attempts"), "2");
}

#[tokio::test]
async fn a_committed_json_response_cut_later_is_redone_and_its_answer_becomes_the_body() {
    let mock = Mock::start(|_, index| match index {
        0 => Reply::Stream {
            status: 200,
            content_type: "application/json",
            chunks: vec![data("\n"), data("{\"choices\": [")],
            ending: Ending::Cut,
        },
        1 => Reply::json(200, completion("redone")),
        _ => Reply::json(500, "{}"),
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m"}"#).await;
    assert_eq!(answer.status, 200);
    assert!(answer.text().starts_with('\n'), "the keep-alive went out first");
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "redone", "{}", answer.text());
    assert_eq!(mock.arrivals(), 2);

    let failing = Mock::start(|_, index| match index {
        0 => Reply::Stream {
            status: 200,
            content_type: "application/json",
            chunks: vec![data("\n"), data("{\"choices\": [")],
            ending: Ending::Cut,
        },
        _ => Reply::json(400, r#"{"error":{"message":"bad"}}"#),
    })
    .await;
    let sluice = Sluice::start(config_for(&failing)).await;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m"}"#).await;
    assert_eq!(answer.status, 200, "the status was committed");
    assert!(
        answer.json()["error"]["message"].as_str().unwrap_or("").contains("cut"),
        "sluice's error as the body: {}",
        answer.text()
    );
}

#[tokio::test]
async fn keep_alive_blank_lines_commit_a_json_response_and_flow_at_once() {
    let gate = Arc::new(Notify::new());
    let mock = Mock::start({
        let gate = gate.clone();
        move |_, _| Reply::Stream {
            status: 200,
            content_type: "application/json",
            chunks: vec![data("\n"), Chunk::Gate(gate.clone()), data("{\"ok\":true}")],
            ending: Ending::Complete,
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let response = send("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m"}"#).await;
    assert_eq!(response.status(), 200, "the head came with the first blank line");
    let mut body = response.into_body();
    let first = next_chunk(&mut body).await.unwrap().unwrap();
    assert_eq!(&first[..], b"\n", "the keep-alive reached the client as it came");
    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"{\"ok\":true}");
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_closes_the_upstream_request() {
    let mut script = vec![chunk_event("first")];
    for _ in 0..200 {
        script.push(Chunk::Pause(Duration::from_millis(50)));
        script.push(data(": keep-alive\n\n"));
    }
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), Ending::Complete)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let response = send("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    let mut body = response.into_body();
    next_chunk(&mut body).await.unwrap().unwrap();
    drop(body);
    assert!(mock.wait_cancelled(1, LIMIT).await, "the upstream stream was not closed");
    assert!(eventually(LIMIT, || sluice.proxy.admission().snapshot().inflight == 0).await, "the slot was not freed");
}

#[tokio::test]
async fn a_silent_upstream_gets_504_and_no_retry() {
    let mock = Mock::start(|_, _| Reply::Silence).await;
    let mut config = config_for(&mock);
    config.upstream.header_timeout = Duration::from_millis(300);
    let sluice = Sluice::start(config).await;
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.error_type(), "sluice_upstream_timeout");
    assert_eq!(mock.arrivals(), 1);
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_once_the_deadline_passes() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.upstream.base_url = format!("http://127.0.0.1:{port}");
    config.queue.max_wait = Duration::from_millis(500);
    let sluice = Sluice::start(config).await;
    let answer = chat(&sluice, "m", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.error_type(), "sluice_upstream_unreachable");
    assert!(answer.header("x-sluice-attempts").parse::<u32>().unwrap() >= 1);
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_stream_finish() {
    let gate = Arc::new(Notify::new());
    let script = vec![chunk_event("before"), Chunk::Gate(gate.clone()), chunk_event("after"), data("data: [DONE]\n\n")];
    let mock = Mock::start(move |_, _| Reply::sse(script.clone(), Ending::Complete)).await;
    let mut sluice = Sluice::start(config_for(&mock)).await;
    let response = send("POST", &sluice.url("/v1/chat/completions"), &[], r#"{"model":"m","stream":true}"#).await;
    let mut body = response.into_body();
    next_chunk(&mut body).await.unwrap().unwrap();

    let addr = sluice.addr;
    let server = sluice.begin_shutdown();
    // The listener closes: new connections are refused while the stream is still running.
    assert!(
        eventually(LIMIT, || std::net::TcpStream::connect(addr).is_err()).await,
        "still accepting after shutdown began"
    );
    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(LIMIT, server).await.expect("server stops once the stream is done").unwrap();
}

#[tokio::test]
async fn h2c_clients_are_served_and_streamed_to() {
    let gate = Arc::new(Notify::new());
    let script = vec![chunk_event("first"), Chunk::Gate(gate.clone()), chunk_event("last"), data("data: [DONE]\n\n")];
    let mock = Mock::start(move |request, _| {
        if request.json()["stream"] == true {
            Reply::sse(script.clone(), Ending::Complete)
        } else {
            Reply::json(200, completion("over h2c"))
        }
    })
    .await;
    let sluice = Sluice::start(config_for(&mock)).await;
    // HTTP/2 with prior knowledge over plain TCP: what an h2c client does.
    let h2c: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let post = |body: &'static str| {
        http::Request::post(sluice.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let response = h2c.request(post(r#"{"model":"m"}"#)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("over h2c"));

    let mut stream = h2c.request(post(r#"{"model":"m","stream":true}"#)).await.unwrap().into_body();
    let first = tokio::time::timeout(LIMIT, next_chunk(&mut stream)).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("first"), "the first event arrives before the gate opens");
    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    assert_eq!(mock.requests()[0].headers["authorization"], format!("Bearer {TEST_KEY}").as_str());
}
