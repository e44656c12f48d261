//! Observability against the mock upstream: /metrics after a mixed run passes `promtool check metrics`
//! and its counters match what the mock saw and what clients got; tokens come from responses' usage
//! (streamed too) without changing a byte; /status has its fields; the admin token and the switches
//! hold; the alert rules pass `promtool check rules`; the dashboard renders in headless Chromium.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::config::Secret;
use support::*;
use tokio::sync::Notify;

/// A completion whose usage the token metrics must pick up.
fn completion_with_usage(prompt: u64, completion: u64) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "created": 1, "model": "deepseek-v4-pro",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_cache_hit_tokens": 1, "prompt_cache_miss_tokens": prompt - 1,
                  "completion_tokens_details": {"reasoning_tokens": 2}}
    })
    .to_string()
}

fn usage_stream(with_usage: bool) -> Vec<Chunk> {
    let mut chunks = vec![chunk_event("Hel"), data(": keep-alive\n\n"), chunk_event("lo")];
    if with_usage {
        chunks.push(data(
            "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":5,\"total_tokens\":16}}\n\n",
        ));
    }
    chunks.push(data("data: [DONE]\n\n"));
    chunks
}

/// The value of one sample line in the exposition (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: run scripts/install-test-deps (Debian package prometheus)");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn metrics_after_a_mixed_run_pass_promtool_and_match_what_happened() {
    let gate = Arc::new(Notify::new());
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (handler_gate, handler_seen) = (gate.clone(), seen.clone());
    let mock = Mock::start(move |request, _| {
        let kind = request.json()["kind"].as_str().unwrap_or("").to_string();
        let count = {
            let mut seen = handler_seen.lock().unwrap();
            let n = seen.entry(kind.clone()).or_default();
            *n += 1;
            *n
        };
        match kind.as_str() {
            "absorb" if count <= 2 => Reply::json(429, r#"{"error":{"message":"Rate Limit Reached"}}"#),
            "stream" => Reply::sse(usage_stream(true), Ending::Complete),
            "hold" => Reply::Stream {
                status: 200,
                content_type: "application/json",
                chunks: vec![Chunk::Gate(handler_gate.clone()), data("{}")],
                ending: Ending::Complete,
            },
            "bad" => Reply::json(400, r#"{"error":{"message":"no"}}"#),
            _ => Reply::json(200, completion_with_usage(20, 7)),
        }
    })
    .await;
    let mut config = config_for(&mock);
    config.limits.max_concurrency = 1;
    config.queue.max_depth = 1;
    let sluice = Arc::new(Sluice::start(config).await);
    let post = |kind: &'static str| {
        let sluice = sluice.clone();
        async move {
            let body = serde_json::json!({"model": "deepseek-v4-pro", "kind": kind, "stream": kind == "stream"});
            call("POST", &sluice.url("/v1/chat/completions"), &[], body.to_string()).await
        }
    };
    assert_eq!(post("plain").await.status, 200);
    let absorbed = post("absorb").await;
    assert_eq!((absorbed.status, absorbed.header("x-sluice-attempts")), (200, "3"));
    assert_eq!(post("stream").await.status, 200);
    assert_eq!(post("bad").await.status, 400);
    // One request holds the only slot, one waits, the next finds the queue full.
    let held = tokio::spawn(post("hold"));
    assert!(eventually(Duration::from_secs(10), || mock.arrivals() == 7).await);
    let queued = tokio::spawn(post("plain"));
    assert!(eventually(Duration::from_secs(10), || sluice.proxy.admission().snapshot().queued == 1).await);
    assert_eq!(post("plain").await.error_type(), "sluice_queue_full");
    gate.notify_one();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(queued.await.unwrap().status, 200);

    let metrics = call("GET", &sluice.url("/metrics"), &[], "").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    let (ok, report) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics:\n{report}\n{text}");

    // What the mock saw: 8 arrivals (the queue-full request never left sluice), two 429s, one 400.
    assert_eq!(mock.arrivals(), 8);
    assert_eq!(sample(&text, "sluice_upstream_attempts_total{status=\"429\",account=\"default\"}"), 2.0);
    assert_eq!(sample(&text, "sluice_upstream_attempts_total{status=\"400\",account=\"default\"}"), 1.0);
    assert_eq!(sample(&text, "sluice_upstream_attempts_total{status=\"200\",account=\"default\"}"), 5.0);
    assert_eq!(sample(&text, "sluice_upstream_429_absorbed_total"), 2.0);
    assert_eq!(sample(&text, "sluice_retries_total{reason=\"throttled\"}"), 2.0);
    // What the clients got.
    let requests = |outcome: &str| {
        sample(&text, &format!("sluice_requests_total{{outcome=\"{outcome}\",model=\"deepseek-v4-pro\"}}"))
    };
    assert_eq!(requests("success"), 5.0);
    assert_eq!(requests("client_error"), 1.0);
    // A full queue answers before the body (and its model) is read.
    let unknown =
        |outcome: &str| sample(&text, &format!("sluice_requests_total{{outcome=\"{outcome}\",model=\"unknown\"}}"));
    assert_eq!(unknown("queue_full"), 1.0);
    // Tokens: three JSON completions carry usage (20 + 7 each; the held one answers "{}"), and the
    // stream's final usage chunk (11 + 5).
    let tokens = |kind: &str| {
        sample(&text, &format!("sluice_tokens_total{{model=\"deepseek-v4-pro\",kind=\"{kind}\",account=\"default\"}}"))
    };
    assert_eq!(tokens("prompt"), 3.0 * 20.0 + 11.0);
    assert_eq!(tokens("completion"), 3.0 * 7.0 + 5.0);
    assert_eq!(tokens("reasoning"), 3.0 * 2.0);
    assert_eq!(tokens("prompt_cache_hit"), 3.0);
    assert_eq!(sample(&text, "sluice_concurrency_limit{model=\"all\",account=\"all\"}"), 1.0);
    assert!(text.contains("sluice_build_info{version=\""));
}

#[tokio::test]
async fn stream_tokens_come_from_the_usage_chunk_and_the_bytes_are_untouched() {
    let with_usage = Arc::new(Mutex::new(true));
    let flag = with_usage.clone();
    let mock = Mock::start(move |_, _| Reply::sse(usage_stream(*flag.lock().unwrap()), Ending::Complete)).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    let body = r#"{"model":"deepseek-v4-flash","stream":true,"stream_options":{"include_usage":true}}"#;
    let expected: Vec<u8> =
        usage_stream(true).iter().flat_map(|c| if let Chunk::Data(d) = c { d.to_vec() } else { vec![] }).collect();
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], body).await;
    assert_eq!(answer.body.as_ref(), expected.as_slice(), "the stream reached the client unchanged");
    let tokens = || async {
        let text = call("GET", &sluice.url("/metrics"), &[], "").await.text();
        let prompt =
            sample(&text, "sluice_tokens_total{model=\"deepseek-v4-flash\",kind=\"prompt\",account=\"default\"}");
        let completion =
            sample(&text, "sluice_tokens_total{model=\"deepseek-v4-flash\",kind=\"completion\",account=\"default\"}");
        (prompt, completion)
    };
    assert_eq!(tokens().await, (11.0, 5.0));

    *with_usage.lock().unwrap() = false;
    let answer = call("POST", &sluice.url("/v1/chat/completions"), &[], body).await;
    assert!(answer.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(tokens().await, (11.0, 5.0), "a stream without usage adds none");
}

#[tokio::test]
async fn status_has_its_fields() {
    let mock = Mock::start(|_, _| Reply::json(200, completion_with_usage(3, 2))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    chat(&sluice, "deepseek-v4-pro", &[]).await;
    let status = call("GET", &sluice.url("/status"), &[], "").await;
    assert_eq!(status.status, 200);
    let s = status.json();
    for pointer in [
        "/version",
        "/uptime_seconds",
        "/upstream",
        "/queue/depth",
        "/queue/by_priority/high",
        "/queue/by_priority/normal",
        "/queue/by_priority/low",
        "/queue/max_depth",
        "/inflight/all",
        "/inflight/by_model/deepseek-v4-pro/limit",
        "/limits/max_concurrency",
        "/limits/rate_per_second",
        "/probing/lanes",
        "/probing/total_seconds",
        "/lanes/0/account",
        "/lanes/0/why",
        "/totals/requests/success",
        "/totals/upstream_attempts",
        "/totals/upstream_429",
        "/totals/upstream_429_absorbed",
        "/recent/upstream_429_rate",
        "/recent/queue_wait_p99_ms",
    ] {
        assert!(s.pointer(pointer).is_some(), "/status lacks {pointer}: {s}");
    }
    assert_eq!(s["totals"]["requests"]["success"], 1);
    assert_eq!(s["totals"]["prompt_tokens"], 3);
    // A fresh lane starts modest and grows with what the upstream accepts; the configured cap stays.
    assert_eq!(s["inflight"]["by_model"]["deepseek-v4-pro"]["limit"], sluice::admission::INITIAL_LIMIT);
    assert_eq!(s["inflight"]["by_model"]["deepseek-v4-pro"]["configured_limit"], 500);
    assert_eq!(s["upstream"], mock.url());
}

#[tokio::test]
async fn the_admin_token_guards_operator_endpoints_only() {
    let mock = Mock::start(|_, _| Reply::json(200, "{}")).await;
    let mut config = config_for(&mock);
    config.observe.admin_token = Some(Secret::new("s3cret"));
    config.observe.dashboard = false;
    let sluice = Sluice::start(config).await;
    for path in ["/metrics", "/status"] {
        let denied = call("GET", &sluice.url(path), &[], "").await;
        assert_eq!((denied.status, denied.error_type().as_str()), (401, "sluice_unauthorized"), "{path}");
        let wrong = call("GET", &sluice.url(path), &[("authorization", "Bearer nope")], "").await;
        assert_eq!(wrong.status, 401, "{path}");
        assert_eq!(call("GET", &sluice.url(path), &[("authorization", "Bearer s3cret")], "").await.status, 200);
        assert_eq!(call("GET", &sluice.url(&format!("{path}?token=s3cret")), &[], "").await.status, 200);
    }
    let off = call("GET", &sluice.url("/dashboard?token=s3cret"), &[], "").await;
    assert_eq!((off.status, off.error_type().as_str()), (404, "sluice_not_found"));
    assert_eq!(call("GET", &sluice.url("/healthz"), &[], "").await.status, 200);
    assert_eq!(call("GET", &sluice.url("/readyz"), &[], "").await.status, 200);
    assert_eq!(mock.arrivals(), 0, "operator endpoints are never forwarded");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/prometheus-alerts.yml");
    let (ok, report) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{report}");
    assert!(report.contains("SUCCESS"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_in_headless_chromium_without_errors() {
    // A hidden cap of 2 on v4-flash, answers that take a while: the lane learns a limit far below 2500.
    let mock = Mock::start_capped(Some(2), |_, _| Reply::Stream {
        status: 200,
        content_type: "application/json",
        chunks: vec![Chunk::Pause(Duration::from_millis(100)), Chunk::Data(completion_with_usage(5, 5).into())],
        ending: Ending::Complete,
    })
    .await;
    let mut config = config_for(&mock);
    config.cache.enabled = true;
    let sluice = Arc::new(Sluice::start(config).await);
    for _ in 0..3 {
        chat(&sluice, "deepseek-v4-pro", &[("x-sluice-cache", "use")]).await;
    }
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let sluice = sluice.clone();
            tokio::spawn(async move { chat(&sluice, "deepseek-v4-flash", &[]).await.status })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), 200);
    }
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    let flash = status["lanes"].as_array().unwrap().iter().find(|l| l["model"] == "deepseek-v4-flash").unwrap().clone();
    let learned = flash["limit"].as_u64().unwrap();
    assert!(learned <= 2, "{flash}");
    let page = call("GET", &sluice.url("/dashboard"), &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(!page.text().contains("http://") && !page.text().contains("https://"), "no external resources");

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let profile = out_dir.join(format!("chromium-profile-{}", std::process::id()));
    let screenshot = out_dir.join("dashboard.png");
    let url = sluice.url("/dashboard");
    let run = |extra: &[&str]| {
        let mut command = Command::new("chromium");
        command.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,900",
            "--virtual-time-budget=6000",
        ]);
        command.arg(format!("--user-data-dir={}", profile.display())).args(extra).arg(&url);
        command
    };
    let dom = tokio::task::spawn_blocking({
        let mut command = run(&["--dump-dom"]);
        move || command.output().expect("chromium not found: run scripts/install-test-deps (Debian package chromium)")
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    let log = String::from_utf8_lossy(&dom.stderr);
    let console_errors: Vec<&str> =
        log.lines().filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains("Error"))).collect();
    assert!(console_errors.is_empty(), "console errors:\n{}", console_errors.join("\n"));
    // The script ran and drew from /status: the header and the cards carry live values.
    assert!(html.contains(&format!("v{}", env!("CARGO_PKG_VERSION"))), "header not filled:\n{html}");
    assert!(!html.contains("connecting…"), "never reached /status:\n{html}");
    // The limits in force, not only the caps: each lane's learned limit of its configured cap.
    assert!(html.contains(&format!("deepseek-v4-flash learned limit {learned} of 2500")), "{html}");
    assert!(html.contains("deepseek-v4-pro learned limit 8 of 500"), "{html}");
    assert!(html.contains(&format!("id=\"inflight-now\">0 <small>/ {}</small>", learned + 8)), "{html}");
    assert!(html.contains("<td>deepseek-v4-flash</td><td>0</td>"), "the lanes table:\n{html}");
    // The 429 headline is a rate; the running total is its subtitle.
    let (throttled, absorbed) = (&status["totals"]["upstream_429"], &status["totals"]["upstream_429_absorbed"]);
    assert!(throttled.as_u64().unwrap() > 0, "{status}");
    assert!(html.contains(&format!("<small>/s · {throttled} in all, {absorbed} absorbed")), "{html}");
    assert!(html.contains("cache (memory): 2 hits · 0 coalesced · 67% saved · 20 tokens"), "{html}");
    let shot = tokio::task::spawn_blocking({
        let mut command = run(&[&format!("--screenshot={}", screenshot.display())]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(shot.status.success() && screenshot.exists(), "{}", String::from_utf8_lossy(&shot.stderr));
    let _ = std::fs::remove_dir_all(&profile);
}

#[tokio::test]
async fn alerts_and_grafana_use_only_metrics_sluice_exposes() {
    let mock = Mock::start(|_, _| Reply::json(200, completion_with_usage(1, 1))).await;
    let sluice = Sluice::start(config_for(&mock)).await;
    chat(&sluice, "deepseek-v4-pro", &[]).await;
    let exposed = call("GET", &sluice.url("/metrics"), &[], "").await.text();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/prometheus-alerts.yml", "config/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        // Metric names in PromQL are followed by a selector, a range, a closing parenthesis or a comma;
        // error types named in the prose (sluice_deadline_exceeded, …) are not.
        let mut names: Vec<&str> = text
            .match_indices("sluice_")
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                (&rest[..end], rest[end..].chars().next().unwrap_or(' '))
            })
            .filter(|(_, next)| matches!(next, '{' | '[' | ')' | ','))
            .map(|(name, _)| name)
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 3, "{file}: the scan found too few metric names: {names:?}");
        for name in names {
            // Declared families count even before their first sample; histogram series map to theirs.
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            let declared = exposed.lines().any(|line| line.starts_with(&format!("# TYPE {family} ")));
            assert!(declared, "{file} uses {name}, which /metrics does not expose");
        }
    }
}
