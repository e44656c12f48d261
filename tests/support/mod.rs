//! Shared test support: the mock upstream, sluice running in-process on 127.0.0.1:0, and small HTTP
//! client helpers (hyper's client for ordinary requests, raw TCP for the malformed ones).
#![allow(dead_code, unused_imports)]

pub mod accounts;
pub mod cluster;
pub mod daemon;
pub mod egress;
pub mod mock;
pub mod redis_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice::config::{ApiKey, Config};
use sluice::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use accounts::MockAccount;
pub use mock::{
    canonical_stream, canonical_text, chunk_event, completion, data, gated_first, prefix_words, Chunk, Ending, Mock,
    Recorded, Reply,
};

/// The key tests configure; the mock checks it arrives instead of the client's.
pub const TEST_KEY: &str = "sk-test-configured-key";

/// A config that forwards to `mock` with the test key and quick retries.
pub fn config_for(mock: &Mock) -> Config {
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstream.base_url = mock.url();
    config.upstream.api_key = ApiKey::new(TEST_KEY, "test");
    config.retry.base_delay = Duration::from_millis(10);
    config.retry.max_delay = Duration::from_millis(200);
    config.queue.max_wait = Duration::from_secs(60);
    // No balance reads: tests count what reaches the mock (the accounts tests turn them on).
    config.upstream.balance.poll = Duration::ZERO;
    // Straight to the mock, whatever proxy the environment names (the egress tests set their own).
    config.upstream.proxy = Some(sluice::config::ProxyUrl::new("none"));
    config
}

/// sluice running in this process.
pub struct Sluice {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Sluice {
    pub async fn start(config: Config) -> Sluice {
        config.validate().expect("test config is valid");
        let listener = TcpListener::bind(config.server.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Arc::new(Proxy::new(config).unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice::server::run(listener, proxy.clone(), async move {
            let _ = stopped.await;
        }));
        Sluice { addr, proxy, stop: Some(stop), task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Begins the graceful shutdown; await the returned handle for its end.
    pub fn begin_shutdown(&mut self) -> &mut JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        &mut self.task
    }
}

/// A plain HTTP client (no retries of its own).
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and returns its response with the body still streaming.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Incoming> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client().request(request.body(Full::new(body.into())).unwrap()).await.unwrap()
}

/// A finished exchange: status, headers, whole body.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn error_type(&self) -> String {
        self.json()["error"]["type"].as_str().unwrap_or("").to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request and reads the whole response.
pub async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    let response = send(method, url, headers, body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body }
}

/// POSTs a chat request for `model`.
pub async fn chat(sluice: &Sluice, model: &str, headers: &[(&str, &str)]) -> Answer {
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    call("POST", &sluice.url("/v1/chat/completions"), &all, body).await
}

/// Writes raw bytes to `addr` and reads until the server closes or `limit` passes.
pub async fn raw(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the next data frame of a streaming response body (None at the end).
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(err) => return Some(Err(err)),
        }
    }
}

/// Waits until `check` holds, polling every 10 ms for at most `limit`; returns whether it held.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// Counts of each item.
pub fn tally<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> HashMap<T, usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}
