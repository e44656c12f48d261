//! Benchmark: what waiting requests cost. Starts the release `sluice` binary with a tiny rate limit
//! (1/min, burst 1) in front of a local stub upstream, opens N client connections that each send one chat
//! request, so all but the first wait in sluice's queue, then reads sluice's RSS and CPU time from /proc:
//! idle, and with N requests queued, over the same measuring window.
//!
//! Run: `cargo build --release && cargo run --release --example queue_hold -- 10000`
//! `CONNECT_ONLY=1` opens the connections without sending requests (the cost of idle connections);
//! `SLUICE_*`, `MALLOC_*` and `_RJEM_*` (jemalloc's `_RJEM_MALLOC_CONF`) variables are passed on to sluice, to try
//! other settings.
//! Traffic stays on 127.0.0.1; the run is bounded (about 30 s).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WINDOW: Duration = Duration::from_secs(10);

/// (RSS in KiB, CPU time in clock ticks) of a process.
fn sample(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss, ticks)
}

/// CPU used over `WINDOW`, as a percentage of one core (clock ticks are 1/100 s on Linux).
async fn cpu_percent(pid: u32) -> f64 {
    let (_, before) = sample(pid);
    tokio::time::sleep(WINDOW).await;
    let (_, after) = sample(pid);
    (after - before) as f64 / WINDOW.as_secs_f64()
}

/// A stub upstream that answers every request at once.
async fn stub_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if stream.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let upstream = stub_upstream().await;
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let binary = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("sluice");
    let mut child = Command::new(&binary)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("http://{upstream}")])
        .env("SLUICE_LIMITS__RATE", "1/min")
        .env("SLUICE_LIMITS__BURST", "1")
        .env("SLUICE_QUEUE__MAX_DEPTH", (requests + 10).to_string())
        .env("SLUICE_QUEUE__MAX_WAIT", "10m")
        .env("SLUICE_LOG__LEVEL", "warn")
        .envs(
            std::env::vars()
                .filter(|(k, _)| k.starts_with("MALLOC_") || k.starts_with("_RJEM_") || k.starts_with("SLUICE_")),
        )
        .env_remove("DEEPSEEK_API_KEY")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e} (run `cargo build --release` first)", binary.display()));
    let pid = child.id();
    let sluice: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect(sluice).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_idle, _) = sample(pid);
    let cpu_idle = cpu_percent(pid).await;

    let body = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hello there"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut clients = Vec::with_capacity(requests);
    for _ in 0..requests {
        let mut stream = TcpStream::connect(sluice).await.unwrap();
        if std::env::var_os("CONNECT_ONLY").is_none() {
            stream.write_all(request.as_bytes()).await.unwrap();
        }
        clients.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every connection but the first must still be waiting: nothing to read yet.
    let mut answered = 0;
    for stream in &mut clients {
        let mut byte = [0u8; 1];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_micros(1), stream.peek(&mut byte)).await {
            answered += usize::from(n > 0);
        }
    }
    let (rss_queued, _) = sample(pid);
    let cpu_queued = cpu_percent(pid).await;
    let _ = child.kill();
    let _ = child.wait();

    let delta_kib = rss_queued.saturating_sub(rss_idle);
    println!("| requests queued | answered early | RSS idle | RSS queued | RSS added | per request | CPU idle | CPU queued |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {answered} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} bytes | {cpu_idle:.2} % | {cpu_queued:.2} % |",
        requests - answered,
        rss_idle as f64 / 1024.0,
        rss_queued as f64 / 1024.0,
        delta_kib as f64 / 1024.0,
        delta_kib as f64 * 1024.0 / requests as f64,
    );
}
