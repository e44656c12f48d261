//! loadgen: the benchmarks' load generator. Closed loop — each client runs a number of workers that send
//! one request after another (`--clients 40,20,12,8`) — open loop at a fixed rate (`--rate 1000`), or a
//! burst: N requests at once, each sent once, waiting for the last (`--burst 1500`). Every request
//! carries `x-sluice-client: cN`. Prints one JSON object: per-client completions, statuses, latency
//! percentiles (to headers, to the first body byte, to the end) in ms, and the elapsed time.
//!
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8787/v1/chat/completions \
//!     --duration 30s (--clients 4,4 | --rate 1000 | --burst 1500) [--stream | --stream-every 2] \
//!     [--model deepseek-v4-flash] [--temperature 0] [--unique]
//!
//! `--temperature` puts a temperature in every body (0 makes it eligible for sluice's cache); `--unique`
//! makes every body different (a cache can then only miss).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Default)]
struct Results {
    completed: BTreeMap<usize, u64>,
    statuses: BTreeMap<String, u64>,
    headers_ms: Vec<f64>,
    first_byte_ms: Vec<f64>,
    total_ms: Vec<f64>,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Bodies sent so far (`--unique` numbers them).
static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn one(client: &HttpClient, url: &str, body: &Bytes, who: usize, results: &Mutex<Results>, unique: bool) {
    let body = if unique {
        let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = String::from_utf8_lossy(body).replacen("\"hello\"", &format!("\"hello {n}\""), 1);
        Bytes::from(text)
    } else {
        body.clone()
    };
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer bench")
        .header("x-sluice-client", format!("c{who}"))
        .body(Full::new(body))
        .unwrap();
    let started = Instant::now();
    let outcome = async {
        let response = client.request(request).await.map_err(|e| format!("error: {e}"))?;
        let headers = started.elapsed();
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "body error".to_string())?;
            if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                first = Some(started.elapsed());
            }
        }
        Ok::<_, String>((status, headers, first.unwrap_or_else(|| started.elapsed()), started.elapsed()))
    }
    .await;
    let mut results = results.lock().unwrap();
    match outcome {
        Ok((status, headers, first, total)) => {
            *results.statuses.entry(status.to_string()).or_default() += 1;
            if status == 200 {
                *results.completed.entry(who).or_default() += 1;
                results.headers_ms.push(headers.as_secs_f64() * 1e3);
                results.first_byte_ms.push(first.as_secs_f64() * 1e3);
                results.total_ms.push(total.as_secs_f64() * 1e3);
            }
        }
        Err(kind) => *results.statuses.entry(kind.split(':').next().unwrap_or("error").to_string()).or_default() += 1,
    }
}

fn percentiles(values: &mut [f64]) -> serde_json::Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return 0.0;
        }
        values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1]
    };
    serde_json::json!({ "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999), "mean":
        if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 } })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let url = get("--url").expect("--url");
    let duration = humantime::parse_duration(&get("--duration").unwrap_or("10s".into())).unwrap();
    let stream = args.iter().any(|a| a == "--stream");
    let stream_every = get("--stream-every").and_then(|n| n.parse::<usize>().ok());
    let model = get("--model").unwrap_or("deepseek-v4-flash".into());
    let temperature = get("--temperature").and_then(|t| t.parse::<f64>().ok());
    let unique = args.iter().any(|a| a == "--unique");
    let body_of = |stream: bool| {
        let mut body =
            serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]});
        if let Some(temperature) = temperature {
            body["temperature"] = serde_json::json!(temperature);
        }
        Bytes::from(body.to_string())
    };
    let body = body_of(stream);
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(4096).build_http();
    let results = Arc::new(Mutex::new(Results::default()));
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    if let Some(burst) = get("--burst").and_then(|n| n.parse::<usize>().ok()) {
        // A burst: every request at once, each sent once (a batch job firing its whole backlog).
        for n in 0..burst {
            let streams = stream || stream_every.is_some_and(|k| k > 0 && n % k == 0);
            let (client, url, body, results) = (client.clone(), url.clone(), body_of(streams), results.clone());
            tasks.push(tokio::spawn(async move { one(&client, &url, &body, n % 4, &results, unique).await }));
        }
    } else if let Some(rate) = get("--rate").and_then(|r| r.parse::<f64>().ok()) {
        // Open loop: one request every 1/rate, whatever the answers do (bounded at 20,000 in flight).
        let limit = Arc::new(tokio::sync::Semaphore::new(20_000));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut n = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
            let (client, url, body, results) = (client.clone(), url.clone(), body.clone(), results.clone());
            let who = n % 4;
            n += 1;
            tasks.push(tokio::spawn(async move {
                one(&client, &url, &body, who, &results, unique).await;
                drop(permit);
            }));
        }
    } else {
        let clients: Vec<usize> =
            get("--clients").unwrap_or("4".into()).split(',').map(|n| n.trim().parse().unwrap()).collect();
        for (who, workers) in clients.iter().enumerate() {
            for _ in 0..*workers {
                let (client, url, body, results) = (client.clone(), url.clone(), body.clone(), results.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        one(&client, &url, &body, who, &results, unique).await;
                    }
                }));
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut results = results.lock().unwrap();
    let completed: u64 = results.completed.values().sum();
    let report = serde_json::json!({
        "elapsed_s": elapsed,
        "completed": completed,
        "throughput_rps": completed as f64 / elapsed,
        "per_client": results.completed.values().collect::<Vec<_>>(),
        "statuses": results.statuses,
        "headers_ms": percentiles(&mut results.headers_ms),
        "first_byte_ms": percentiles(&mut results.first_byte_ms),
        "total_ms": percentiles(&mut results.total_ms),
    });
    println!("{report}");
}
