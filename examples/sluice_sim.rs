//! sluice-sim: a DeepSeek-like upstream for benchmarks, with a *hidden* capacity. It is not part of the
//! daemon. Past its concurrency cap (which can follow a schedule) or its token-bucket rate it answers
//! 429 "Rate Limit Reached" (optionally with Retry-After); a fraction of requests can get 503. Accepted
//! requests take a configurable latency and answer an OpenAI-shaped completion, or an SSE stream when the
//! body asks for `"stream": true`. `GET /sim/counters` reports what it saw, per second too.
//!
//! With `--per-key`, the cap applies to each API key (`Authorization`) on its own, as DeepSeek's applies
//! to each account.
//!
//! With `--fault`, it misbehaves on purpose (for the fault benchmark): `silent` (never answers), `slow-first:20s`
//! (a stream's first content comes that late), `cut-after:40` / `stall-after:40` (a stream breaks or goes
//! silent after 40 chunks), `down:60s` (503 for the first minute), `cut-refuse:40` (cut after 40 chunks,
//! and a prefix completion on /beta gets 400). Continuations (`POST /beta/chat/completions` with an assistant prefix) go on from
//! the chunk the prefix ends at.
//!
//! cargo run --release --example sluice_sim -- --listen 127.0.0.1:9000 --caps 40:20s,10:20s,30:20s \
//!     --latency 200ms [--jitter 50ms] [--rate 100/s] [--retry-after 1] [--fail-503 0.01] \
//!     [--chunks 20 --chunk-delay 10ms] [--per-key] [--fault cut-after:40]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

struct Options {
    listen: SocketAddr,
    /// (cap, how long); the last entry holds forever.
    caps: Vec<(usize, Duration)>,
    latency: Duration,
    jitter: Duration,
    rate: Option<f64>,
    retry_after: Option<u64>,
    fail_503: f64,
    chunks: usize,
    chunk_delay: Duration,
    per_key: bool,
    fault: Fault,
}

/// A misbehaviour on purpose.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Silent,
    SlowFirst(Duration),
    CutAfter(usize),
    StallAfter(usize),
    Down(Duration),
    CutRefuse(usize),
}

fn parse_args() -> Options {
    let mut options = Options {
        listen: "127.0.0.1:9000".parse().unwrap(),
        caps: vec![(usize::MAX, Duration::MAX)],
        latency: Duration::from_millis(200),
        jitter: Duration::ZERO,
        rate: None,
        retry_after: None,
        fail_503: 0.0,
        chunks: 10,
        chunk_delay: Duration::from_millis(10),
        per_key: false,
        fault: Fault::None,
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--per-key") {
        args.remove(at);
        options.per_key = true;
    }
    let duration = |v: &str| humantime::parse_duration(v).unwrap_or_else(|e| panic!("{v}: {e}"));
    for pair in args.chunks(2) {
        let (flag, value) = (pair[0].as_str(), pair.get(1).map_or("", String::as_str));
        match flag {
            "--listen" => options.listen = value.parse().unwrap(),
            "--caps" => {
                options.caps = value
                    .split(',')
                    .map(|step| {
                        let (cap, length) = step.split_once(':').unwrap_or((step, "1000000h"));
                        (cap.parse().unwrap(), duration(length))
                    })
                    .collect()
            }
            "--latency" => options.latency = duration(value),
            "--jitter" => options.jitter = duration(value),
            "--rate" => options.rate = Some(value.trim_end_matches("/s").parse().unwrap()),
            "--retry-after" => options.retry_after = Some(value.parse().unwrap()),
            "--fail-503" => options.fail_503 = value.parse().unwrap(),
            "--chunks" => options.chunks = value.parse().unwrap(),
            "--chunk-delay" => options.chunk_delay = duration(value),
            "--fault" => {
                let (kind, arg) = value.split_once(':').unwrap_or((value, ""));
                options.fault = match kind {
                    "silent" => Fault::Silent,
                    "slow-first" => Fault::SlowFirst(duration(arg)),
                    "cut-after" => Fault::CutAfter(arg.parse().unwrap()),
                    "stall-after" => Fault::StallAfter(arg.parse().unwrap()),
                    "down" => Fault::Down(duration(arg)),
                    "cut-refuse" => Fault::CutRefuse(arg.parse().unwrap()),
                    other => panic!("unknown fault {other}"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    options
}

/// One second of history.
#[derive(Default, Clone, Copy, serde::Serialize)]
struct Second {
    arrivals: u64,
    accepted: u64,
    throttled: u64,
    max_inflight: usize,
    cap: usize,
}

struct Sim {
    options: Options,
    started: Instant,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    /// With `--per-key`: in flight per API key.
    per_key: Mutex<std::collections::HashMap<String, Arc<AtomicUsize>>>,
    arrivals: AtomicU64,
    accepted: AtomicU64,
    completed: AtomicU64,
    throttled: AtomicU64,
    failed_503: AtomicU64,
    /// Token bucket: (tokens, last refill).
    bucket: Mutex<(f64, Instant)>,
    timeline: Mutex<Vec<Second>>,
}

impl Sim {
    fn cap_now(&self) -> usize {
        let mut elapsed = self.started.elapsed();
        for (cap, length) in &self.options.caps {
            if elapsed < *length {
                return *cap;
            }
            elapsed -= *length;
        }
        self.options.caps.last().map_or(usize::MAX, |(cap, _)| *cap)
    }

    fn second(&self, update: impl FnOnce(&mut Second)) {
        let index = self.started.elapsed().as_secs() as usize;
        let mut timeline = self.timeline.lock().unwrap();
        if timeline.len() <= index {
            timeline.resize(index + 1, Second::default());
        }
        update(&mut timeline[index]);
    }

    fn take_token(&self) -> bool {
        let Some(rate) = self.options.rate else { return true };
        let mut bucket = self.bucket.lock().unwrap();
        let now = Instant::now();
        bucket.0 = (bucket.0 + rate * (now - bucket.1).as_secs_f64()).min(rate.max(1.0));
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Holds a slot of the hidden capacity (and of its key's, with `--per-key`) until dropped (with the
/// response body).
struct Slot(Arc<Sim>, Option<Arc<AtomicUsize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        if let Some(key) = &self.1 {
            key.fetch_sub(1, Ordering::SeqCst);
        }
        self.0.completed.fetch_add(1, Ordering::Relaxed);
    }
}

struct SimBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    _slot: Option<Slot>,
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| bytes.map(Frame::data)))
    }
}

fn whole(
    status: u16,
    content_type: &str,
    body: String,
    extra: Option<(&str, String)>,
    slot: Option<Slot>,
) -> Response<SimBody> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(Bytes::from(body)));
    let mut response = Response::builder().status(status).header("content-type", content_type);
    if let Some((name, value)) = extra {
        response = response.header(name, value);
    }
    response.body(SimBody { rx, _slot: slot }).unwrap()
}

const USAGE: &str = r#"{"prompt_tokens":20,"completion_tokens":10,"total_tokens":30}"#;

async fn answer(sim: Arc<Sim>, request: Request<Incoming>) -> Response<SimBody> {
    if request.uri().path() == "/sim/counters" {
        let body = serde_json::json!({
            "arrivals": sim.arrivals.load(Ordering::Relaxed),
            "accepted": sim.accepted.load(Ordering::Relaxed),
            "completed": sim.completed.load(Ordering::Relaxed),
            "throttled": sim.throttled.load(Ordering::Relaxed),
            "failed_503": sim.failed_503.load(Ordering::Relaxed),
            "max_inflight": sim.max_inflight.load(Ordering::Relaxed),
            "inflight": sim.inflight.load(Ordering::Relaxed),
            "cap": sim.cap_now(),
            "seconds": *sim.timeline.lock().unwrap(),
        });
        return whole(200, "application/json", body.to_string(), None, None);
    }
    let key = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let continuation = request.uri().path().starts_with("/beta/");
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let parsed = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
    let stream = parsed["stream"] == true;
    // A continuation goes on from the chunk its assistant prefix ends at.
    let from = parsed["messages"]
        .as_array()
        .and_then(|m| m.last())
        .filter(|m| m["prefix"] == true)
        .map_or(0, |m| m["content"].as_str().unwrap_or("").split_whitespace().count());
    let fault = if continuation { Fault::None } else { sim.options.fault };
    match (fault, sim.options.fault) {
        (Fault::Silent, _) => std::future::pending::<()>().await,
        (Fault::Down(until), _) if sim.started.elapsed() < until => {
            sim.arrivals.fetch_add(1, Ordering::Relaxed);
            sim.failed_503.fetch_add(1, Ordering::Relaxed);
            return whole(503, "application/json", r#"{"error":{"message":"Server overloaded"}}"#.into(), None, None);
        }
        (_, Fault::CutRefuse(_)) if continuation => {
            return whole(
                400,
                "application/json",
                r#"{"error":{"message":"prefix is not supported"}}"#.into(),
                None,
                None,
            );
        }
        _ => {}
    }
    sim.arrivals.fetch_add(1, Ordering::Relaxed);
    sim.second(|s| s.arrivals += 1);
    if sim.options.fail_503 > 0.0 && fastrand::f64() < sim.options.fail_503 {
        sim.failed_503.fetch_add(1, Ordering::Relaxed);
        return whole(503, "application/json", r#"{"error":{"message":"Server overloaded"}}"#.into(), None, None);
    }
    let cap = sim.cap_now();
    let counter = if sim.options.per_key {
        sim.per_key.lock().unwrap().entry(key).or_insert_with(|| Arc::new(AtomicUsize::new(0))).clone()
    } else {
        Arc::new(AtomicUsize::new(0))
    };
    let limited = if sim.options.per_key { &*counter } else { &sim.inflight };
    let admitted = limited.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1));
    if admitted.is_ok() && sim.options.per_key {
        sim.inflight.fetch_add(1, Ordering::SeqCst);
    }
    let throttle = match admitted {
        Err(_) => true,
        Ok(_) if !sim.take_token() => {
            limited.fetch_sub(1, Ordering::SeqCst);
            if sim.options.per_key {
                sim.inflight.fetch_sub(1, Ordering::SeqCst);
            }
            true
        }
        Ok(_) => false,
    };
    if throttle {
        sim.throttled.fetch_add(1, Ordering::Relaxed);
        sim.second(|s| s.throttled += 1);
        let retry_after = sim.options.retry_after.map(|s| ("retry-after", s.to_string()));
        let body = r#"{"error":{"message":"Rate Limit Reached","type":"rate_limit_error"}}"#;
        return whole(429, "application/json", body.into(), retry_after, None);
    }
    let inflight = sim.inflight.load(Ordering::SeqCst);
    sim.max_inflight.fetch_max(inflight, Ordering::Relaxed);
    sim.accepted.fetch_add(1, Ordering::Relaxed);
    sim.second(|s| {
        s.accepted += 1;
        s.max_inflight = s.max_inflight.max(inflight);
        s.cap = cap;
    });
    let slot = Slot(sim.clone(), sim.options.per_key.then_some(counter));
    let jitter = sim.options.jitter.mul_f64(fastrand::f64() * 2.0);
    let latency = (sim.options.latency + jitter).saturating_sub(sim.options.jitter);
    if !stream {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let body = format!(
            r#"{{"id":"sim","object":"chat.completion","created":1,"model":"deepseek-v4-flash","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{USAGE}}}"#
        );
        return whole(200, "application/json", body, None, Some(slot));
    }
    let (tx, rx) = mpsc::channel(4);
    let (chunks, delay) = (sim.options.chunks, sim.options.chunk_delay);
    tokio::spawn(async move {
        tokio::time::sleep(latency).await;
        let role = "data: {\"id\":\"sim\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        if tx.send(Ok(Bytes::from_static(role.as_bytes()))).await.is_err() {
            return;
        }
        if let Fault::SlowFirst(late) = fault {
            tokio::time::sleep(late).await;
        }
        for i in from..chunks {
            match fault {
                Fault::CutAfter(n) | Fault::CutRefuse(n) if i >= n => {
                    let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                    return;
                }
                Fault::StallAfter(n) if i >= n => return tx.closed().await,
                _ => {}
            }
            let event = format!(
                "data: {{\"id\":\"sim\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}}}}]}}\n\n"
            );
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                return;
            }
            tokio::time::sleep(delay).await;
        }
        let usage = format!("data: {{\"id\":\"sim\",\"choices\":[],\"usage\":{USAGE}}}\n\ndata: [DONE]\n\n");
        let _ = tx.send(Ok(Bytes::from(usage))).await;
    });
    Response::builder().header("content-type", "text/event-stream").body(SimBody { rx, _slot: Some(slot) }).unwrap()
}

#[tokio::main]
async fn main() {
    let options = parse_args();
    let listener = tokio::net::TcpListener::bind(options.listen).await.unwrap();
    eprintln!("sluice-sim listening on {}", listener.local_addr().unwrap());
    let sim = Arc::new(Sim {
        bucket: Mutex::new((options.rate.unwrap_or(0.0).max(1.0), Instant::now())),
        options,
        started: Instant::now(),
        inflight: AtomicUsize::new(0),
        max_inflight: AtomicUsize::new(0),
        per_key: Mutex::new(std::collections::HashMap::new()),
        arrivals: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        throttled: AtomicU64::new(0),
        failed_503: AtomicU64::new(0),
        timeline: Mutex::new(Vec::new()),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let sim = sim.clone();
                async move { Ok::<_, Infallible>(answer(sim, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
