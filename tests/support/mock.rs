//! A mock DeepSeek upstream: a real hyper HTTP/1.1 server on 127.0.0.1:0 whose answers a test scripts
//! per request — JSON, SSE with pauses, gates and keep-alive comments, a cut or a stalled stream, no
//! answer at all — with an optional hidden concurrency cap (429 past it). It records what it received.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::accounts::{balance_body, AccountSlot, Caller, MockAccounts};

/// One piece of a scripted streamed body.
#[derive(Clone)]
pub enum Chunk {
    Data(Bytes),
    Pause(Duration),
    /// Waits until the test calls `notify_one`/`notify_waiters` on it.
    Gate(Arc<Notify>),
}

/// How a streamed body ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    /// The connection breaks mid-body.
    Cut,
    /// Nothing more is ever sent (until the test ends).
    Stall,
}

/// A scripted answer.
#[derive(Clone)]
pub enum Reply {
    Json {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    Stream {
        status: u16,
        content_type: &'static str,
        chunks: Vec<Chunk>,
        ending: Ending,
    },
    /// Never sends response headers.
    Silence,
    /// Another reply with extra response headers.
    Headed(Box<Reply>, Vec<(&'static str, String)>),
}

impl Reply {
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Reply::Json { status, headers: vec![], body: body.into() }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        match &mut self {
            Reply::Json { headers, .. } | Reply::Headed(_, headers) => headers.push((name, value.into())),
            _ => return Reply::Headed(Box::new(self), vec![(name, value.into())]),
        }
        self
    }

    pub fn sse(chunks: Vec<Chunk>, ending: Ending) -> Self {
        Reply::Stream { status: 200, content_type: "text/event-stream", chunks, ending }
    }
}

/// What the mock received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub arrived: Instant,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn model(&self) -> String {
        self.json()["model"].as_str().unwrap_or("").to_string()
    }
}

type Handler = dyn Fn(&Recorded, usize) -> Reply + Send + Sync;

#[derive(Default)]
struct Counters {
    requests: Mutex<Vec<Recorded>>,
    inflight: Mutex<HashMap<String, usize>>,
    max_inflight: Mutex<HashMap<String, usize>>,
    inflight_total: AtomicUsize,
    max_inflight_total: AtomicUsize,
    over_cap: AtomicUsize,
    /// Per arrival: whether the hidden cap answered it 429.
    throttled_flags: Mutex<Vec<bool>>,
    cancelled: AtomicUsize,
    cancelled_notify: Notify,
    /// When set, the mock knows accounts and keys (see `accounts.rs`).
    accounts: Option<Arc<MockAccounts>>,
}

/// A running mock upstream.
pub struct Mock {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
}

impl Mock {
    /// Starts a mock answering with `handler(request, arrival index)`.
    pub async fn start(handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static) -> Mock {
        Self::start_capped(None, handler).await
    }

    /// Starts a mock that answers 429 (and does not call `handler`) while `cap` requests are in flight.
    pub async fn start_capped(
        cap: Option<usize>,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        Self::serve(cap, None, Arc::new(handler)).await
    }

    /// Starts a mock that knows `accounts`: a request's key picks its account, which answers 401 for an
    /// unknown or revoked key, 402 while out of balance, 429 past its own hidden cap, and
    /// `GET /user/balance`; everything else goes to `handler`.
    pub async fn start_accounts(
        accounts: Vec<Arc<super::accounts::MockAccount>>,
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        Self::serve(None, Some(Arc::new(MockAccounts(accounts))), Arc::new(handler)).await
    }

    async fn serve(cap: Option<usize>, accounts: Option<Arc<MockAccounts>>, handler: Arc<Handler>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters { accounts, ..Counters::default() });
        let shared = counters.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counters = shared.clone();
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let counters = counters.clone();
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(answer(request, cap, &counters, &*handler).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Mock { addr, counters }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.counters.requests.lock().unwrap().clone()
    }

    pub fn arrivals(&self) -> usize {
        self.counters.requests.lock().unwrap().len()
    }

    /// Most requests in flight at once (arrival to end of response body), all models.
    pub fn max_inflight(&self) -> usize {
        self.counters.max_inflight_total.load(Ordering::SeqCst)
    }

    pub fn max_inflight_for(&self, model: &str) -> usize {
        self.counters.max_inflight.lock().unwrap().get(model).copied().unwrap_or(0)
    }

    pub fn inflight(&self) -> usize {
        self.counters.inflight_total.load(Ordering::SeqCst)
    }

    /// Requests answered 429 by the hidden cap.
    pub fn over_cap(&self) -> usize {
        self.counters.over_cap.load(Ordering::SeqCst)
    }

    /// Per arrival, in order: whether the hidden cap answered it 429.
    pub fn throttled_flags(&self) -> Vec<bool> {
        self.counters.throttled_flags.lock().unwrap().clone()
    }

    /// Streamed bodies whose reader went away before the end.
    pub fn cancelled(&self) -> usize {
        self.counters.cancelled.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until `cancelled()` reaches `n`.
    pub async fn wait_cancelled(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.cancelled() < n {
            if tokio::time::timeout_at(deadline, self.counters.cancelled_notify.notified()).await.is_err() {
                return self.cancelled() >= n;
            }
        }
        true
    }
}

/// Counts a request in flight until dropped (with its response body).
struct InflightGuard {
    counters: Arc<Counters>,
    model: String,
    /// The account's slot, when the mock knows accounts.
    _account: Option<AccountSlot>,
}

impl InflightGuard {
    /// Counts one more request in flight, unless that would pass `cap`.
    fn try_new(counters: &Arc<Counters>, model: String, cap: Option<usize>) -> Option<Self> {
        let cap = cap.unwrap_or(usize::MAX);
        let reserved =
            counters.inflight_total.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1));
        let total = reserved.ok()? + 1;
        counters.max_inflight_total.fetch_max(total, Ordering::SeqCst);
        let mut inflight = counters.inflight.lock().unwrap();
        let now = inflight.entry(model.clone()).or_default();
        *now += 1;
        let mut max = counters.max_inflight.lock().unwrap();
        let peak = max.entry(model.clone()).or_default();
        *peak = (*peak).max(*now);
        drop(max);
        drop(inflight);
        Some(Self { counters: counters.clone(), model, _account: None })
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.counters.inflight_total.fetch_sub(1, Ordering::SeqCst);
        if let Some(n) = self.counters.inflight.lock().unwrap().get_mut(&self.model) {
            *n -= 1;
        }
    }
}

async fn answer(
    request: Request<Incoming>,
    cap: Option<usize>,
    counters: &Arc<Counters>,
    handler: &Handler,
) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/".into(), |pq| pq.to_string()),
        headers: parts.headers,
        body,
        arrived: Instant::now(),
    };
    let index = {
        let mut requests = counters.requests.lock().unwrap();
        requests.push(recorded.clone());
        requests.len() - 1
    };
    let mut account_slot = None;
    if let Some(accounts) = &counters.accounts {
        let caller = accounts.caller(recorded.headers.get("authorization").and_then(|v| v.to_str().ok()));
        let account = match caller {
            Caller::Refused => {
                let body =
                    r#"{"error":{"message":"Authentication Fails (no such user)","type":"authentication_error"}}"#;
                return respond(401, "application/json", vec![], MockBody::full(body, None));
            }
            Caller::Account(account) => account,
        };
        if recorded.path == "/user/balance" {
            return respond(200, "application/json", vec![], MockBody::full(balance_body(&account), None));
        }
        if !account.available() {
            let body = r#"{"error":{"message":"Insufficient Balance","type":"payment_required"}}"#;
            return respond(402, "application/json", vec![], MockBody::full(body, None));
        }
        match account.reserve() {
            Some(slot) => account_slot = Some(slot),
            None => {
                counters.over_cap.fetch_add(1, Ordering::SeqCst);
                counters.throttled_flags.lock().unwrap().push(true);
                let body = r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error"}}"#;
                return respond(429, "application/json", vec![], MockBody::full(body, None));
            }
        }
    }
    let guard = InflightGuard::try_new(counters, recorded.model(), cap).map(|mut guard| {
        guard._account = account_slot;
        guard
    });
    counters.throttled_flags.lock().unwrap().push(guard.is_none());
    let Some(guard) = guard else {
        counters.over_cap.fetch_add(1, Ordering::SeqCst);
        let body =
            r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;
        return respond(429, "application/json", vec![], MockBody::full(body, None));
    };
    let (reply, mut extra) = match handler(&recorded, index) {
        Reply::Headed(reply, headers) => (*reply, headers),
        reply => (reply, vec![]),
    };
    match reply {
        Reply::Json { status, mut headers, body } => {
            headers.append(&mut extra);
            respond(status, "application/json", headers, MockBody::full(body, Some(guard)))
        }
        Reply::Headed(..) => unreachable!("headers are unwrapped above"),
        Reply::Stream { status, content_type, chunks, ending } => {
            let (tx, rx) = mpsc::channel(1);
            let counters = counters.clone();
            tokio::spawn(async move {
                for chunk in chunks {
                    match chunk {
                        Chunk::Pause(pause) => tokio::time::sleep(pause).await,
                        Chunk::Gate(gate) => gate.notified().await,
                        Chunk::Data(data) => {
                            if tx.send(Ok(data)).await.is_err() {
                                counters.cancelled.fetch_add(1, Ordering::SeqCst);
                                counters.cancelled_notify.notify_waiters();
                                return;
                            }
                        }
                    }
                }
                match ending {
                    Ending::Complete => {}
                    Ending::Cut => {
                        let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                    }
                    Ending::Stall => {
                        tx.closed().await;
                        counters.cancelled.fetch_add(1, Ordering::SeqCst);
                        counters.cancelled_notify.notify_waiters();
                    }
                }
            });
            respond(status, content_type, extra, MockBody { full: None, rx: Some(rx), _guard: Some(guard) })
        }
        Reply::Silence => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

fn respond(
    status: u16,
    content_type: &str,
    headers: Vec<(&'static str, String)>,
    body: MockBody,
) -> Response<MockBody> {
    let mut builder =
        Response::builder().status(StatusCode::from_u16(status).unwrap()).header("content-type", content_type);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    // A connection per request: under tokio's paused clock a reused keep-alive connection can miss its
    // wake-up (the clock jumps ahead of the loopback I/O), so the mock does not offer reuse.
    builder.header("x-ds-trace-id", "mock-trace").header("connection", "close").body(body).unwrap()
}

/// The mock's response body: whole, or fed from the scripted stream task.
pub struct MockBody {
    full: Option<Bytes>,
    rx: Option<mpsc::Receiver<Result<Bytes, std::io::Error>>>,
    _guard: Option<InflightGuard>,
}

impl MockBody {
    fn full(body: impl Into<String>, guard: Option<InflightGuard>) -> Self {
        Self { full: Some(Bytes::from(body.into())), rx: None, _guard: guard }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(full) = self.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(full))));
        }
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }
}

/// An OpenAI-shaped chat completion.
pub fn completion(content: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": "deepseek-v4-flash",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    })
    .to_string()
}

/// One SSE chunk event carrying `content`.
pub fn chunk_event(content: &str) -> Chunk {
    let event = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-v4-flash",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    });
    Chunk::Data(Bytes::from(format!("data: {event}\n\n")))
}

pub fn data(text: &'static str) -> Chunk {
    Chunk::Data(Bytes::from_static(text.as_bytes()))
}

/// A handler that holds the first request's response body at `gate` and answers every other at once.
pub fn gated_first(gate: Arc<Notify>) -> impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static {
    move |_, index| {
        if index == 0 {
            Reply::Stream {
                status: 200,
                content_type: "application/json",
                chunks: vec![Chunk::Gate(gate.clone()), data("{}")],
                ending: Ending::Complete,
            }
        } else {
            Reply::json(200, "{}")
        }
    }
}

/// The canonical answer of the resume scenarios: `words` words, one per chunk.
pub fn canonical_text(words: usize) -> String {
    (0..words).map(|i| format!("w{i} ")).collect()
}

/// A DeepSeek-like stream of the canonical answer from word `from` on: a role chunk first (unless
/// `from > 0`: a continuation has one too, which sluice drops), one content chunk per word, then the
/// finish, usage and `[DONE]` — unless `cut_after` words have gone out (then `ending`).
pub fn canonical_stream(words: usize, from: usize, cut_after: Option<usize>, ending: Ending, id: &str) -> Reply {
    let event = |delta: serde_json::Value, finish: Option<&str>| {
        let event = serde_json::json!({
            "id": id, "object": "chat.completion.chunk", "created": 7, "model": "deepseek-v4-flash",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        Chunk::Data(Bytes::from(format!("data: {event}\n\n")))
    };
    let mut chunks =
        vec![data(": keep-alive\n\n"), event(serde_json::json!({"role": "assistant", "content": ""}), None)];
    for i in from..words {
        if cut_after.is_some_and(|n| i >= n) {
            return Reply::sse(chunks, ending);
        }
        chunks.push(event(serde_json::json!({"content": format!("w{i} ")}), None));
    }
    chunks.push(event(serde_json::json!({"content": ""}), Some("stop")));
    let usage = serde_json::json!({"id": id, "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 10 + from, "completion_tokens": words - from, "total_tokens": 10 + words}});
    chunks.push(Chunk::Data(Bytes::from(format!("data: {usage}\n\n"))));
    chunks.push(data("data: [DONE]\n\n"));
    Reply::sse(chunks, Ending::Complete)
}

/// Where a continuation request starts: the words already in its assistant prefix (0: not one).
pub fn prefix_words(request: &Recorded) -> usize {
    let messages = request.json()["messages"].as_array().cloned().unwrap_or_default();
    match messages.last() {
        Some(last) if last["prefix"] == true => last["content"].as_str().unwrap_or("").split_whitespace().count(),
        _ => 0,
    }
}
