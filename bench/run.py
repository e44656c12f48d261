#!/usr/bin/env python3
"""sluice's benchmark suite: builds the release binaries, runs every scenario side by side in one run on
this machine, prints the tables and writes BENCHMARKS.md. Everything runs on 127.0.0.1 and is bounded in
time; the full suite takes about 8 minutes, --quick about one (a smoke test CI runs so the suite never
rots; CI asserts nothing about speed).

    python3 bench/run.py            # full run, writes BENCHMARKS.md
    python3 bench/run.py --quick    # seconds per scenario, writes target/bench-quick.md

Scenarios: overhead (direct vs sluice vs nginx, wrk at saturation and a fixed 1k rps), memory (10,000
queued requests), limiter precision, persistent throttling (attempts per second by queue depth, sluice
against the openai SDK's own retries), deep-queue cold start, absorption of a hidden concurrency cap
(with the openai SDK's own retries as the baseline), adaptive vs static limits under a changing capacity,
streaming time to first byte, an HTTP/2 upstream's stream limit, the cache (hit against miss latency, memory and Redis; coalescing), faults
with and without a fallback, 1 against 3 instances (alone and as one cluster). Upstream: examples/sluice_sim.rs (examples/h2_upstream.rs for HTTP/2); load: wrk (Debian) and
examples/loadgen.rs. BENCH_SLUICE_BIN=/path runs another sluice binary (a before/after comparison).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout)["target_directory"]
RELEASE = os.path.join(TARGET, "release")
SLUICE = os.environ.get("BENCH_SLUICE_BIN") or os.path.join(RELEASE, "sluice")
SIM = os.path.join(RELEASE, "examples", "sluice_sim")
LOADGEN = os.path.join(RELEASE, "examples", "loadgen")
QUEUE_HOLD = os.path.join(RELEASE, "examples", "queue_hold")
H2_UPSTREAM = os.path.join(RELEASE, "examples", "h2_upstream")
TEST_CA = os.path.join(ROOT, "tests", "fixtures", "tls", "ca.pem")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
TMP = tempfile.mkdtemp(prefix="sluice-bench-")


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=20):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Process:
    """A background process, stopped on exit from the with-block."""

    def __init__(self, args, port=None, env=None):
        self.args, self.port = args, port
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_") and k != "DEEPSEEK_API_KEY"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        if self.port:
            wait_port(self.port)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sim(*flags):
    port = free_port()
    return Process([SIM, "--listen", f"127.0.0.1:{port}", *flags], port), port


def sluice(upstream_port, *, adaptive=True, extra=None, config=None, url=None):
    port = free_port()
    env = {
        "SLUICE_LIMITS__ADAPTIVE": "true" if adaptive else "false",
        "SLUICE_LIMITS__MAX_CONCURRENCY": "100000",
        "SLUICE_QUEUE__MAX_DEPTH": "100000",
        "SLUICE_LOG__LEVEL": "info",
    }
    env.update(extra or {})
    args = [SLUICE, "--listen", f"127.0.0.1:{port}", "--upstream", url or f"http://127.0.0.1:{upstream_port}"]
    if config:
        path = os.path.join(TMP, f"sluice-{port}.toml")
        with open(path, "w") as f:
            f.write(config)
        args += ["--config", path]
    return Process(args, port, env), port


def sluice_variants(upstream_port, variants):
    """sluice once per variant for the side-by-side scripts (ab.py, cpu.py): {name: {"ENV": "v", "BIN":
    "/path"}} → {name: (process, port)}, none started yet. "BIN" runs another binary than the release one."""
    global SLUICE
    procs = {}
    default_bin = SLUICE
    try:
        for name, env in variants.items():
            env = dict(env)
            SLUICE = env.pop("BIN", default_bin)
            procs[name] = sluice(upstream_port, adaptive=False, extra=env)
    finally:
        SLUICE = default_bin
    return procs


TWO_ACCOUNTS = """
[[upstream.accounts]]
name = "a"
api_key_env = "BENCH_KEY_A"
[[upstream.accounts]]
name = "b"
api_key_env = "BENCH_KEY_B"
"""


def nginx(upstream_port):
    port = free_port()
    conf = os.path.join(TMP, f"nginx-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
error_log /dev/null crit;
pid {TMP}/nginx-{port}.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream sim {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    return Process(["nginx", "-c", conf, "-g", "daemon off;"], port), port


def sim_counters(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/counters", timeout=10) as response:
        return json.load(response)


def loadgen(port, duration, *flags):
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    out = subprocess.run([LOADGEN, "--url", url, "--duration", f"{duration}s", *flags],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"rps\\": %f, \\"p50\\": %f, \\"p90\\": %f, \\"p99\\": %f, \\"p999\\": %f, \\"errors\\": %d}\\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"""


def wrk(port, duration, connections=64):
    script = os.path.join(TMP, "post.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-s", script,
                          f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("JSON "))
    return json.loads(line[5:])


def client_errors(*results):
    """Answers other than 200 in loadgen (or sdk_load) results, all together."""
    return sum(n for r in results for status, n in r["statuses"].items() if status != "200")


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def jain(values):
    values = [v for v in values]
    if not values or sum(values) == 0:
        return 0.0
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# ---------------------------------------------------------------------------------------------- scenarios

def overhead(quick):
    """The same load against the simulator directly, through sluice (adaptive off, caps far above), and
    through nginx: wrk at saturation and loadgen at a fixed rate, repeated, medians."""
    repeats, seconds = (1, 2) if quick else (3, 10)
    sim_proc, sim_port = sim("--latency", "0ms")
    rows = {}
    with sim_proc:
        s_proc, s_port = sluice(sim_port, adaptive=False)
        n_proc, n_port = nginx(sim_port)
        with s_proc, n_proc:
            targets = {"direct": sim_port, "sluice": s_port, "nginx": n_port}
            for name, port in targets.items():
                wrk(port, 1)  # warm up connections
            for name, port in targets.items():
                sat = [wrk(port, seconds) for _ in range(repeats)]
                fixed = [loadgen(port, seconds, "--rate", "1000")["total_ms"] for _ in range(repeats)]
                rows[name] = {
                    "sat_rps": median_of(sat, "rps"), "sat_p50": median_of(sat, "p50"), "sat_p99": median_of(sat, "p99"),
                    "sat_p999": median_of(sat, "p999"), "sat_errors": sum(r["errors"] for r in sat),
                    "p50": median_of(fixed, "p50"), "p90": median_of(fixed, "p90"), "p99": median_of(fixed, "p99"),
                    "p999": median_of(fixed, "p999"),
                }
                log(f"overhead {name}: {rows[name]}")
    return rows


def memory(quick):
    """queue_hold's row for N waiting requests, then for N connections that send nothing."""
    held = "1000" if quick else "10000"
    rows = []
    for what, env in [("requests queued", {}), ("idle connections (no request)", {"CONNECT_ONLY": "1"})]:
        out = subprocess.run([QUEUE_HOLD, held], capture_output=True, text=True, check=True, env={**os.environ, **env})
        cells = out.stdout.strip().splitlines()[-1].split("|")
        cells[1] = f" {cells[1].strip()} {what} "
        rows.append("|".join(cells))
    return rows


def limiter(quick):
    """Configured rate R, offered 4R: what the upstream saw, divided by R."""
    rate, seconds = 50, (5 if quick else 30)
    sim_proc, sim_port = sim("--latency", "0ms")
    with sim_proc:
        # A short max_wait: the backlog of the 4R offered is turned away after the run instead of drained.
        s_proc, s_port = sluice(sim_port, extra={"SLUICE_LIMITS__RATE": f"{rate}/s", "SLUICE_LIMITS__BURST": "5",
                                                 "SLUICE_QUEUE__MAX_WAIT": "3s"})
        with s_proc:
            loadgen(s_port, seconds, "--rate", str(4 * rate))
            seconds_seen = sim_counters(sim_port)["seconds"]
    # Whole seconds only, the first (burst) and the last (partial) left out.
    steady = [s["arrivals"] for s in seconds_seen[1:seconds]]
    observed = sum(steady) / len(steady)
    return {"rate": rate, "offered": 4 * rate, "observed": observed, "ratio": observed / rate, "seconds": len(steady)}


def absorption(quick):
    """Hidden concurrency caps, closed-loop workers from 4 clients: through sluice (adaptive and static) and
    the plain openai SDK (max_retries=2) straight at the upstream. Two setups: C = 20 × 200 ms with 2C
    workers (10/10/10/10), and the harder C = 8 × 250 ms with 32 workers (4/4/8/16)."""
    seconds = 5 if quick else 60
    setups = [(20, 200, "10,10,10,10"), (8, 250, "4,4,8,16")]
    out = []
    for cap, latency_ms, clients in setups:
        capacity = cap / (latency_ms / 1000)
        rows = {}
        names = ["sluice (adaptive)", "sluice (static)", "openai SDK, no proxy"]
        if cap == setups[0][0]:
            names.insert(1, "sluice (adaptive), two accounts")
        for name in names:
            two = name.endswith("two accounts")
            sim_proc, sim_port = sim("--caps", str(cap), "--latency", f"{latency_ms}ms", *(["--per-key"] if two else []))
            with sim_proc:
                if name.startswith("sluice"):
                    extra = {"SLUICE_LIMITS__MODELS__DEEPSEEK-V4-FLASH__MAX_CONCURRENCY": "500"}
                    if two:
                        extra.update({"BENCH_KEY_A": "sk-bench-a", "BENCH_KEY_B": "sk-bench-b"})
                    s_proc, s_port = sluice(sim_port, adaptive=not name.startswith("sluice (static)"), extra=extra,
                                            config=TWO_ACCOUNTS if two else None)
                    load = ",".join(str(2 * int(n)) for n in clients.split(",")) if two else clients
                    with s_proc:
                        result = loadgen(s_port, seconds, "--clients", load)
                else:
                    out_sdk = subprocess.run([PYTHON, os.path.join(ROOT, "bench", "sdk_load.py"),
                                              f"http://127.0.0.1:{sim_port}/v1", clients, str(seconds)],
                                             capture_output=True, text=True, check=True)
                    result = json.loads(out_sdk.stdout)
                counters = sim_counters(sim_port)
            errors = client_errors(result)
            rows[name] = {
                "errors": errors,
                "goodput": result["throughput_rps"] / capacity,
                "share_429": counters["throttled"] / max(counters["arrivals"], 1),
                "attempts_per_request": counters["arrivals"] / max(result["completed"], 1),
                "p50": result["total_ms"]["p50"], "p99": result["total_ms"]["p99"],
                "jain": jain(result["per_client"]),
            }
            log(f"absorption C={cap} {name}: {rows[name]}")
        out.append({"cap": cap, "latency_ms": latency_ms, "seconds": seconds, "clients": clients, "rows": rows})
    return out


def persistent(quick):
    """An upstream that answers 429 to everything (the sim with a cap of 0): upstream attempts per second
    with N requests waiting, through sluice on its defaults, and with the openai SDK's own retries
    (max_retries=2, closed loop: a request that fails is sent again at once)."""
    depths, seconds = ([1, 10, 100], 4) if quick else ([1, 10, 100, 1000], 12)
    rows = []
    for depth in depths:
        row = {"waiting": depth}
        for name in ["sluice", "sdk"]:
            sim_proc, sim_port = sim("--caps", "0", "--latency", "0ms")
            with sim_proc:
                if name == "sluice":
                    # The deadline ends each request with the window, so the run is bounded.
                    s_proc, s_port = sluice(sim_port, extra={"SLUICE_QUEUE__MAX_WAIT": f"{seconds}s"})
                    with s_proc:
                        loadgen(s_port, seconds, "--clients", str(depth))
                else:
                    subprocess.run([PYTHON, os.path.join(ROOT, "bench", "sdk_load.py"), f"http://127.0.0.1:{sim_port}/v1",
                                    str(depth), str(seconds)], capture_output=True, text=True, check=True)
                timeline = sim_counters(sim_port)["seconds"][:seconds]
            row[name] = sum(s["arrivals"] for s in timeline) / seconds
            row[name + "_first_second"] = timeline[0]["arrivals"] if timeline else 0
        log(f"persistent throttling: {row}")
        rows.append(row)
    return {"seconds": seconds, "rows": rows}


def coldstart(quick):
    """A batch job fires its whole backlog at once at a hidden concurrency cap: time to the last answer
    against the ideal (requests × hold time ÷ cap), and the share of upstream attempts throttled."""
    cases = [("C = 8 × 100 ms, 1,500 requests", 8, 100, 1500, None),
             ("C = 8 × 100 ms, 1,500 requests, half streaming (200 ms)", 8, 100, 1500, 2),
             ("C = 200 × 1 s, 5,000 requests", 200, 1000, 5000, None)]
    if quick:
        cases = [("C = 8 × 100 ms, 300 requests", 8, 100, 300, None)]
    rows = []
    for name, cap, latency_ms, requests, stream_every in cases:
        sim_proc, sim_port = sim("--caps", str(cap), "--latency", f"{latency_ms}ms", "--chunks", "10", "--chunk-delay", "10ms")
        with sim_proc:
            s_proc, s_port = sluice(sim_port, extra={"SLUICE_QUEUE__MAX_WAIT": "5m"})
            with s_proc:
                flags = ["--burst", str(requests)] + (["--stream-every", str(stream_every)] if stream_every else [])
                result = loadgen(s_port, 1, *flags)
            counters = sim_counters(sim_port)
        streams = requests // stream_every if stream_every else 0
        hold_ms = (requests - streams) * latency_ms + streams * (latency_ms + 100)
        ideal = hold_ms / 1000 / cap
        errors = client_errors(result)
        row = {"case": name, "elapsed": result["elapsed_s"], "ideal": ideal, "ratio": result["elapsed_s"] / ideal,
               "share_429": counters["throttled"] / max(counters["arrivals"], 1), "errors": errors,
               "throttled": counters["throttled"], "arrivals": counters["arrivals"]}
        log(f"cold start: {row}")
        rows.append(row)
    return rows


def changing_capacity(quick):
    """Hidden cap 40 -> 10 -> 30 (20 s each), 80 workers from 4 clients with unequal demand, configured cap
    500: adaptive against static."""
    step = 3 if quick else 20
    caps, latency_ms, settle = [40, 10, 30], 200, (1 if quick else 5)
    schedule = ",".join(f"{c}:{step}s" for c in caps)
    rows = {}
    for name, adaptive in [("adaptive", True), ("static", False)]:
        sim_proc, sim_port = sim("--caps", schedule, "--latency", f"{latency_ms}ms")
        with sim_proc:
            s_proc, s_port = sluice(sim_port, adaptive=adaptive,
                                    extra={"SLUICE_LIMITS__MODELS__DEEPSEEK-V4-FLASH__MAX_CONCURRENCY": "500"})
            with s_proc:
                result = loadgen(s_port, step * len(caps), "--clients", "40,20,12,8")
            seconds = sim_counters(sim_port)["seconds"][: step * len(caps)]
        capacity = [caps[min(i // step, len(caps) - 1)] / (latency_ms / 1000) for i in range(len(seconds))]
        converged = [i for i in range(len(seconds)) if i % step >= settle]
        accepted = [s["accepted"] for s in seconds]
        def share(indices):
            arrivals = sum(seconds[i]["arrivals"] for i in indices)
            return sum(seconds[i]["throttled"] for i in indices) / max(arrivals, 1)
        errors = client_errors(result)
        rows[name] = {
            "errors": errors,
            "goodput": sum(accepted) / sum(capacity),
            "goodput_converged": sum(accepted[i] for i in converged) / sum(capacity[i] for i in converged),
            "share_429": share(range(len(seconds))),
            "share_429_converged": share(converged),
            "p50": result["total_ms"]["p50"], "p99": result["total_ms"]["p99"],
        }
        log(f"changing capacity {name}: {rows[name]}")
    return {"step": step, "settle": settle, "rows": rows}


def redis_server():
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return Process(args, port), port


def wait_cache_connected(port, limit=20):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            if json.load(response)["cache"]["connected"]:
                return
        time.sleep(0.05)
    raise RuntimeError("the cache never connected")


def cache(quick):
    """Hit against miss latency (memory and Redis backends; closed loop, 8 workers; the simulator answers at
    once, so a miss costs only the upstream round trip and the store), then coalescing: N identical
    requests at once under a hidden cap, with and without coalescing."""
    seconds = 2 if quick else 10
    latency = {}
    sim_proc, sim_port = sim("--latency", "0ms")
    redis_proc, redis_port = redis_server()
    with sim_proc, redis_proc:
        plain = ["--clients", "8"]
        det = plain + ["--temperature", "0"]
        cases = [("cache off", {}, plain), ("memory", {"SLUICE_CACHE__BACKEND": "memory"}, det),
                 ("redis", {"SLUICE_CACHE__BACKEND": "redis", "SLUICE_CACHE__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, det)]
        for name, extra, flags in cases:
            env = dict(extra, SLUICE_CACHE__ENABLED="true" if extra else "false")
            s_proc, s_port = sluice(sim_port, adaptive=False, extra=env)
            with s_proc:
                wait_cache_connected(s_port) if extra else None
                loadgen(s_port, 1, *flags)  # warm up; the entry is stored
                if not extra:
                    latency[name] = loadgen(s_port, seconds, *flags)
                    continue
                before = sim_counters(sim_port)["arrivals"]
                latency[name + " hit"] = loadgen(s_port, seconds, *flags)
                latency[name + " hit"]["upstream"] = sim_counters(sim_port)["arrivals"] - before
                latency[name + " miss"] = loadgen(s_port, seconds, *flags, "--unique")
            log(f"cache latency {name}: done")
    rows = {name: {"rps": r["throughput_rps"], "p50": r["total_ms"]["p50"], "p99": r["total_ms"]["p99"],
                   "errors": sum(n for st, n in r["statuses"].items() if st != "200"), "upstream": r.get("upstream")}
            for name, r in latency.items()}
    burst, cap, hold_ms = (40, 4, 250) if quick else (200, 4, 500)
    coalescing = {}
    for name, coalesce in [("coalescing on", "true"), ("coalescing off", "false")]:
        sim_proc, sim_port = sim("--caps", str(cap), "--latency", f"{hold_ms}ms")
        with sim_proc:
            extra = {"SLUICE_CACHE__ENABLED": "true", "SLUICE_CACHE__COALESCE": coalesce,
                     "SLUICE_LIMITS__MODELS__DEEPSEEK-V4-FLASH__MAX_CONCURRENCY": "500"}
            s_proc, s_port = sluice(sim_port, extra=extra)
            with s_proc:
                result = loadgen(s_port, 1, "--burst", str(burst), "--temperature", "0")
            counters = sim_counters(sim_port)
        coalescing[name] = {"upstream": counters["arrivals"], "accepted": counters["accepted"],
                            "throttled": counters["throttled"], "elapsed": result["elapsed_s"],
                            "p50": result["total_ms"]["p50"], "p99": result["total_ms"]["p99"],
                            "errors": sum(n for st, n in result["statuses"].items() if st != "200")}
        log(f"coalescing {name}: {coalescing[name]}")
    return {"seconds": seconds, "latency": rows, "burst": burst, "cap": cap, "hold_ms": hold_ms, "coalescing": coalescing}


FALLBACK = """
[[fallbacks]]
name = "flash"
base_url = "http://127.0.0.1:{port}"
api_key_env = "BENCH_FALLBACK_KEY"
[fallbacks.models]
"*" = "deepseek-v4-flash"
"""


def one_request(port, stream, timeout=120):
    """One chat request through sluice: (status, x-sluice-upstream, body text, seconds to the end)."""
    body = json.dumps({"model": "deepseek-v4-pro", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, upstream, text = response.status, response.headers.get("x-sluice-upstream"), response.read().decode()
    except urllib.error.HTTPError as err:
        status, upstream, text = err.code, err.headers.get("x-sluice-upstream"), err.read().decode()
    except Exception as err:  # a response aborted mid-way
        status, upstream, text = "broken", None, str(err)
    return status, upstream, text, time.monotonic() - started


def outcome(status, upstream, text, stream, chunks):
    if status != 200:
        kind = re.search(r'"type":\s*"([^"]+)"', text)
        return f"{status} {kind.group(1) if kind else ''}".strip()
    if stream:
        words = "".join(re.findall(r'"content":"(t\d+ )"', text)).split()
        if text.rstrip().endswith("data: [DONE]") and '"error"' not in text and len(words) == chunks:
            return f"complete ({upstream})"
        kind = re.search(r'"type":\s*"([^"]+)"', text)
        return f"error event {kind.group(1) if kind else ''} after {len(words)} of {chunks} chunks"
    return f"answered ({upstream})"


def faults(quick):
    """One request into each fault, through sluice without and with a fallback (a healthy simulator)."""
    t = (lambda full, short: short) if quick else (lambda full, short: full)
    chunks = 60
    cases = [
        ("silent primary", ["--fault", "silent"], False, {"SLUICE_UPSTREAM__HEADER_TIMEOUT": t("10s", "2s")}),
        (f"first token after {t('20', '4')} s", ["--fault", f"slow-first:{t('20s', '4s')}"], True,
         {"SLUICE_FALLBACK__FIRST_TOKEN_TIMEOUT": t("15s", "1s")}),
        ("stream cut after 40 of 60 chunks", ["--fault", "cut-after:40"], True, {}),
        ("stream stalls after 40 of 60 chunks", ["--fault", "stall-after:40"], True,
         {"SLUICE_UPSTREAM__IDLE_TIMEOUT": t("5s", "2s")}),
        ("stream cut, continuation refused", ["--fault", "cut-refuse:40"], True, {}),
        ("429 to everything", ["--caps", "0"], False,
         {"SLUICE_FALLBACK__AFTER": t("2s", "1s"), "SLUICE_QUEUE__MAX_WAIT": t("10s", "3s")}),
        (f"503 for {t('10', '3')} s, then healthy", ["--fault", f"down:{t('10s', '3s')}"], False,
         {"SLUICE_FALLBACK__AFTER": t("2s", "1s")}),
    ]
    rows = []
    for name, fault, stream, extra in cases:
        row = {"case": name}
        for variant in ["without", "with"]:
            primary_proc, primary_port = sim("--latency", "50ms", "--chunks", str(chunks), "--chunk-delay", "5ms", *fault)
            backup_proc, backup_port = sim("--latency", "50ms", "--chunks", str(chunks), "--chunk-delay", "5ms")
            with primary_proc, backup_proc:
                config = FALLBACK.format(port=backup_port) if variant == "with" else None
                s_proc, s_port = sluice(primary_port, extra=dict(extra, BENCH_FALLBACK_KEY="sk-bench-fallback"), config=config)
                with s_proc:
                    status, upstream, text, seconds = one_request(s_port, stream)
            row[variant] = {"outcome": outcome(status, upstream, text, stream, chunks), "seconds": seconds}
        log(f"faults: {row}")
        rows.append(row)
    return rows


def cluster(quick):
    """1 instance against 3 (alone, and sharing their limits through Redis), 48 closed-loop workers in
    all, in front of one hidden cap C = 8 × 200 ms."""
    seconds, cap, latency_ms, workers = (5 if quick else 30), 8, 200, 48
    capacity = cap / (latency_ms / 1000)
    rows = {}
    for name, count, shared in [("1 instance", 1, False), ("3 instances, each alone", 3, False),
                                ("3 instances, one cluster", 3, True)]:
        sim_proc, sim_port = sim("--caps", str(cap), "--latency", f"{latency_ms}ms")
        with sim_proc:
            results, trips = instances_under_load(sim_port, count, shared, {}, seconds, workers // count)
            counters = sim_counters(sim_port)
        completed = sum(r["completed"] for r in results)
        errors = client_errors(*results)
        rows[name] = {
            "errors": errors,
            "goodput": sum(r["throughput_rps"] for r in results) / capacity,
            "share_429": counters["throttled"] / max(counters["arrivals"], 1),
            "p50": statistics.median(r["total_ms"]["p50"] for r in results),
            "p99": max(r["total_ms"]["p99"] for r in results),
            "round_trips": trips / max(completed, 1),
        }
        log(f"cluster {name}: {rows[name]}")
    return {"seconds": seconds, "cap": cap, "latency_ms": latency_ms, "workers": workers, "rows": rows,
            "rate": cluster_rate(quick)}


def cluster_rate(quick):
    """`limits.rate` with 3 instances (alone, and as one cluster whose GCRA is in Redis), 24 closed-loop
    workers in all against an uncapped upstream (20 ms); and the latency a cluster adds to requests that
    wait for nothing (rate far above the load)."""
    seconds, latency_ms, rate = (4 if quick else 20), 20, 30
    rows = {}
    for name, count, shared, limit, workers in [
            ("3 instances, each alone, rate 30/s", 3, False, rate, 8),
            ("3 instances, one cluster, rate 30/s", 3, True, rate, 8),
            ("1 instance, light load", 1, False, 100000, 3),
            ("3 instances, one cluster, light load", 3, True, 100000, 1)]:
        sim_proc, sim_port = sim("--latency", f"{latency_ms}ms")
        with sim_proc:
            extra = {"SLUICE_LIMITS__RATE": f"{limit}/s", "SLUICE_LIMITS__ADAPTIVE": "false"}
            steady = []
            results, trips = instances_under_load(sim_port, count, shared, extra, seconds, workers,
                                                  sample=lambda: steady.append((time.monotonic(), sim_counters(sim_port)["arrivals"])))
        completed = sum(r["completed"] for r in results)
        (t0, n0), (t1, n1) = steady
        rows[name] = {
            "errors": client_errors(*results),
            "upstream_rps": (n1 - n0) / (t1 - t0),
            "p50": statistics.median(r["total_ms"]["p50"] for r in results),
            "p99": max(r["total_ms"]["p99"] for r in results),
            "round_trips": trips / max(completed, 1),
        }
        log(f"cluster rate {name}: {rows[name]}")
    return {"seconds": seconds, "latency_ms": latency_ms, "rate": rate, "rows": rows}


def instances_under_load(sim_port, count, shared, extra, seconds, workers_each, sample=None):
    """Runs `count` instances in front of the simulator (sharing through a fresh Redis when `shared`),
    `workers_each` closed-loop workers on each; returns the loadgen results and Redis round trips.
    `sample` is called 1 s into the load and 0.5 s before its end (the steady state, no first burst)."""
    redis_proc, redis_port = redis_server()
    with redis_proc:
        extra = dict({"SLUICE_LIMITS__MODELS__DEEPSEEK-V4-FLASH__MAX_CONCURRENCY": "500"}, **extra)
        if shared:
            extra.update({"SLUICE_CLUSTER__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SLUICE_CLUSTER__NAME": "bench"})
        instances = [sluice(sim_port, extra=extra) for _ in range(count)]
        for proc, _ in instances:
            proc.__enter__()
        try:
            if shared:
                for _, port in instances:
                    wait_cache_connected_cluster(port)
            url = lambda port: f"http://127.0.0.1:{port}/v1/chat/completions"
            runs = [subprocess.Popen([LOADGEN, "--url", url(port), "--duration", f"{seconds}s", "--clients", str(workers_each)],
                                     stdout=subprocess.PIPE, text=True) for _, port in instances]
            if sample:
                time.sleep(1)
                sample()
                time.sleep(seconds - 1.5)
                sample()
            results = [json.loads(run.communicate()[0]) for run in runs]
            trips = 0
            if shared:
                for _, port in instances:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
                        trips += json.load(response)["cluster"]["redis_round_trips"]
        finally:
            for proc, _ in instances:
                proc.__exit__(None, None, None)
    return results, trips


def wait_cache_connected_cluster(port, limit=20):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            if (json.load(response).get("cluster") or {}).get("connected"):
                return
        time.sleep(0.05)
    raise RuntimeError("the instance never joined the cluster")


def streaming(quick):
    """Time to first byte of streamed responses: direct against through sluice."""
    seconds = 2 if quick else 10
    sim_proc, sim_port = sim("--latency", "20ms", "--chunks", "20", "--chunk-delay", "5ms")
    with sim_proc:
        s_proc, s_port = sluice(sim_port, adaptive=False)
        with s_proc:
            rows = {name: loadgen(port, seconds, "--stream", "--clients", "8")
                    for name, port in [("direct", sim_port), ("sluice", s_port)]}
    return {name: r["first_byte_ms"] | {"total_p50": r["total_ms"]["p50"]} for name, r in rows.items()}


def h2_streams(quick):
    """An HTTP/2 upstream (TLS, ALPN h2) that allows 10 streams per connection and answers in 50 ms; 64
    closed-loop workers through sluice on its defaults: throughput against the ideal 64 / 50 ms, latency,
    and how many connections the upstream accepted."""
    streams, latency_ms, workers, seconds = 10, 50, 64, (3 if quick else 15)
    port = free_port()
    upstream = subprocess.Popen([H2_UPSTREAM, "--listen", f"127.0.0.1:{port}", "--streams", str(streams),
                                 "--latency", f"{latency_ms}ms"], stdout=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        s_proc, s_port = sluice(port, url=f"https://localhost:{port}",
                                extra={"SLUICE_UPSTREAM__CA_FILE": TEST_CA, "SLUICE_UPSTREAM__PROXY": "none"})
        with s_proc:
            loadgen(s_port, 1, "--clients", "1")  # warm-up: the pool learns the server's stream limit
            r = loadgen(s_port, seconds, "--clients", str(workers))
            with urllib.request.urlopen(f"http://127.0.0.1:{s_port}/status", timeout=5) as response:
                retries = json.load(response)["totals"]["retries"]
    finally:
        upstream.send_signal(signal.SIGINT)  # it prints its count on SIGINT
        out, _ = upstream.communicate(timeout=10)
    rps = r["throughput_rps"]
    row = {"streams": streams, "latency_ms": latency_ms, "workers": workers, "rps": rps,
           "ideal": workers * 1000 / latency_ms, "p50": r["total_ms"]["p50"], "p99": r["total_ms"]["p99"],
           "errors": client_errors(r), "retries": retries, "connections": json.loads(out.strip().splitlines()[-1])["connections"]}
    log(f"h2 streams: {row}")
    return row


# ------------------------------------------------------------------------------------------------- report

def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.splitlines()[1].split()[1]
    return f"{os.cpu_count()} cores (`nproc`), {cpu}, {mem} memory (`free -h`), Linux {os.uname().release}"


def trips_cell(name, row):
    """Redis round trips per request, for a cluster's row of a report table."""
    return f"{row['round_trips']:.2f}" if "cluster" in name else "–"


def report(results, quick, command):
    o, c, s, l = results["overhead"], results["changing"], results["streaming"], results["limiter"]
    lines = [
        "# Benchmarks", "",
        f"Measured {datetime.date.today()} on this project's machine: {machine()}. Release build. All traffic on",
        "127.0.0.1; sluice, the simulator and the load generator share the same 2 cores, so absolute figures are",
        "modest — the ratios, measured side by side in one run, are the point.", "",
        f"Produced by `{command}`" + (" (quick mode: a smoke test, figures not meaningful)." if quick else "."),
        "Upstream: `examples/sluice_sim.rs`; load: wrk 4.1 (Debian; closed loop, 2 threads, 64 connections) and",
        "`examples/loadgen.rs` (fixed rate and per-client closed loops); nginx 1.22 (Debian) as a plain reverse proxy",
        "with a keep-alive upstream pool.", "",
        "## Overhead (simulator answers at once)", "",
        f"Medians of {1 if quick else 3} runs of {2 if quick else 10} s each. sluice runs with `adaptive = false`, caps far",
        "above the load and its default info-level request log.", "",
        "| path | saturation req/s | p50 | p99 | p99.9 | 1k rps: p50 | p90 | p99 | p99.9 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["direct", "sluice", "nginx"]:
        r = o[name]
        lines.append(f"| {name} | {r['sat_rps']:.0f} | {r['sat_p50']:.2f} ms | {r['sat_p99']:.2f} ms | {r['sat_p999']:.2f} ms "
                     f"| {r['p50']:.3f} ms | {r['p90']:.3f} ms | {r['p99']:.3f} ms | {r['p999']:.3f} ms |")
    d, sl, ng = o["direct"], o["sluice"], o["nginx"]
    lines += ["",
        f"- sluice − direct at 1k rps: p50 +{(sl['p50'] - d['p50']) * 1000:.0f} µs, p99 +{(sl['p99'] - d['p99']) * 1000:.0f} µs.",
        f"- sluice ÷ nginx at 1k rps: p50 {sl['p50'] / ng['p50']:.2f}×, p99 {sl['p99'] / ng['p99']:.2f}×; "
        f"saturation throughput {sl['sat_rps'] / ng['sat_rps']:.2f}× nginx, {sl['sat_rps'] / d['sat_rps']:.2f}× direct.", "",
        "## Memory and CPU of waiting requests", "",
        "`examples/queue_hold.rs` (see below for the breakdown):", "",
        "| held | answered early | RSS idle | RSS held | RSS added | per request or connection | CPU idle | CPU held |",
        "|---|---|---|---|---|---|---|---|", *results["memory"], "",
        "## Limiter precision", "",
        f"`limits.rate = \"{l['rate']}/s\"`, burst 5, offered {l['offered']} req/s at a fixed rate: the simulator saw "
        f"{l['observed']:.2f} req/s over {l['seconds']} whole seconds, **{l['ratio']:.3f} × R**.", "",
        "## Persistent throttling: attempts a throttling upstream sees", "",
        f"The upstream answers 429 to everything (no Retry-After). N closed-loop workers wait; upstream attempts per",
        f"second over {results['persistent']['seconds']} s (and in the first second). sluice on its defaults (probe gaps 1 s doubling to 30 s);",
        "the openai SDK with its default retries (max_retries = 2, then the worker sends again).", "",
        "| requests waiting | sluice attempts/s | first second | openai SDK attempts/s | first second |",
        "|---|---|---|---|---|",
    ] + [f"| {r['waiting']} | {r['sluice']:.2f} | {r['sluice_first_second']} | {r['sdk']:.2f} | {r['sdk_first_second']} |"
         for r in results["persistent"]["rows"]] + [
        "",
        "## Deep-queue cold start", "",
        "A batch job fires its whole backlog at once at a hidden cap. Ideal: requests × hold time ÷ cap (a stream",
        "holds its slot 200 ms: 100 ms to the first token, 10 chunks 10 ms apart).", "",
        "| case | time | ideal | time ÷ ideal | upstream 429 share | client errors |", "|---|---|---|---|---|---|",
    ] + [f"| {r['case']} | {r['elapsed']:.2f} s | {r['ideal']:.2f} s | {r['ratio']:.3f} | {100 * r['share_429']:.2f} % "
         f"({r['throttled']} of {r['arrivals']}) | {r['errors']} |" for r in results["coldstart"]] + [
        "",
        "## Absorbing a hidden concurrency cap", "",
    ]
    for a in results["absorption"]:
        lines += [
            f"Hidden cap C = {a['cap']}, {a['latency_ms']} ms per request (capacity {a['cap'] / (a['latency_ms'] / 1000):.0f} req/s), "
            f"{sum(int(n) for n in a['clients'].split(','))} closed-loop workers from 4 clients ({a['clients'].replace(',', '/')}), {a['seconds']} s. sluice's configured",
            "cap is 500; the SDK row is the openai Python SDK (max_retries = 2) straight at the upstream. The two-account row",
            "runs twice the workers against two accounts, each with the cap (goodput ÷ one account's capacity: 2.0 is ideal).", "",
            "| | client errors | goodput ÷ capacity | upstream 429 share | attempts / request | p50 | p99 | Jain fairness |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in a["rows"].items():
            lines.append(f"| {name} | {r['errors']} | {100 * r['goodput']:.1f} %{' (' + format(r['goodput'], '.2f') + ' ×)' if 'two' in name else ''} | {100 * r['share_429']:.1f} % "
                         f"| {r['attempts_per_request']:.2f} | {r['p50']:.0f} ms | {r['p99']:.0f} ms | {r['jain']:.3f} |")
        lines.append("")
    lines += [
        "## Adaptive against static limits under a changing capacity", "",
        f"Hidden cap 40 → 10 → 30, {c['step']} s each, 200 ms per request, 80 workers from 4 clients (40/20/12/8),",
        f"configured cap 500. \"Converged\" leaves out the first {c['settle']} s after each change.", "",
        "| limits | client errors | goodput ÷ capacity | converged | upstream 429 share | converged | p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in c["rows"].items():
        lines.append(f"| {name} | {r['errors']} | {100 * r['goodput']:.1f} % | {100 * r['goodput_converged']:.1f} % "
                     f"| {100 * r['share_429']:.1f} % | {100 * r['share_429_converged']:.1f} % | {r['p50']:.0f} ms | {r['p99']:.0f} ms |")
    lines += ["",
        "## Streaming: time to first byte", "",
        "Simulator: 20 ms before the first chunk, 20 chunks 5 ms apart; 8 closed-loop streams.", "",
        "| path | TTFB p50 | p90 | p99 | whole stream p50 |", "|---|---|---|---|---|",
    ]
    for name, r in s.items():
        lines.append(f"| {name} | {r['p50']:.2f} ms | {r['p90']:.2f} ms | {r['p99']:.2f} ms | {r['total_p50']:.1f} ms |")
    delta = (s['sluice']['p50'] - s['direct']['p50']) * 1000
    lines.append(f"\nsluice − direct, median time to first byte: {delta:+.0f} µs (run-to-run noise is of the same order).")
    h = results["h2"]
    lines += ["",
        "## An HTTP/2 upstream's stream limit", "",
        f"`examples/h2_upstream.rs`: TLS, HTTP/2 only, {h['streams']} streams per connection, every answer after "
        f"{h['latency_ms']} ms; {h['workers']} closed-loop", "workers through sluice on its defaults.", "",
        "| req/s | × ideal (workers ÷ latency) | p50 | p99 | client errors | retried attempts | upstream connections |",
        "|---|---|---|---|---|---|---|",
        f"| {h['rps']:.0f} | {h['rps'] / h['ideal']:.2f} | {h['p50']:.1f} ms | {h['p99']:.1f} ms | {h['errors']} "
        f"| {h['retries']} | {h['connections']} |",
    ]
    k = results["cache"]
    lines += ["",
        "## Cache: hit against miss", "",
        f"Closed loop, 8 workers, {k['seconds']} s per row; the simulator answers at once, so a miss costs the upstream",
        "round trip plus storing the answer. Hit rows repeat one deterministic request (temperature 0); miss rows",
        "make every body different. Redis: Debian's redis-server on 127.0.0.1.", "",
        "| | req/s | p50 | p99 | client errors | upstream calls during the run |", "|---|---|---|---|---|---|",
    ]
    for name, r in k["latency"].items():
        upstream = "" if r["upstream"] is None else str(r["upstream"])
        lines.append(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['errors']} | {upstream} |")
    lines += ["",
        f"## Cache: coalescing identical requests", "",
        f"{k['burst']} identical deterministic requests at once; hidden cap C = {k['cap']}, {k['hold_ms']} ms per request.", "",
        "| | upstream calls | of which 429 | time to the last answer | p50 | p99 | client errors |", "|---|---|---|---|---|---|---|",
    ]
    for name, r in k["coalescing"].items():
        lines.append(f"| {name} | {r['upstream']} | {r['throttled']} | {r['elapsed']:.2f} s | {r['p50']:.0f} ms | {r['p99']:.0f} ms | {r['errors']} |")
    cl = results["cluster"]
    lines += ["",
        "## Several instances: 1 against 3, alone and as one cluster", "",
        f"Hidden cap C = {cl['cap']} × {cl['latency_ms']} ms (capacity {cl['cap'] / (cl['latency_ms'] / 1000):.0f} req/s), "
        f"{cl['workers']} closed-loop workers in all, spread evenly over the instances, {cl['seconds']} s. The cluster",
        "shares each lane's limit and slots through Redis (Debian's redis-server on 127.0.0.1).", "",
        "| | client errors | goodput ÷ capacity | upstream 429 share | p50 | p99 | Redis round trips / request |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in cl["rows"].items():
        trips = trips_cell(name, r)
        lines.append(f"| {name} | {r['errors']} | {100 * r['goodput']:.1f} % | {100 * r['share_429']:.1f} % "
                     f"| {r['p50']:.0f} ms | {r['p99']:.0f} ms | {trips} |")
    cr = cl["rate"]
    lines += ["",
        f"The global rate (`limits.rate = \"{cr['rate']}/s\"`, adaptive off), 3 instances with 8 closed-loop workers each in",
        f"front of an uncapped simulator ({cr['latency_ms']} ms), {cr['seconds']} s; then the latency a cluster adds to",
        "requests that wait for nothing (rate far above the load; 3 workers on 1 instance against 1 on each of 3).", "",
        "| | client errors | requests/s the upstream saw (steady) | p50 | p99 | Redis round trips / request |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in cr["rows"].items():
        trips = trips_cell(name, r)
        lines.append(f"| {name} | {r['errors']} | {r['upstream_rps']:.1f} | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {trips} |")
    lines += ["",
        "## Faults: without and with a fallback", "",
        "One request into each fault (a simulator misbehaving on purpose, `--fault`), through sluice on its defaults",
        "(resume on) except the timeouts named, without a fallback and with one (a healthy simulator as",
        "`[[fallbacks]]`). Streams are 60 chunks; \"complete\" means every chunk, `[DONE]` and no error event.", "",
        "| fault | without a fallback | time | with a fallback | time |", "|---|---|---|---|---|",
    ]
    for r in results["faults"]:
        lines.append(f"| {r['case']} | {r['without']['outcome']} | {r['without']['seconds']:.2f} s "
                     f"| {r['with']['outcome']} | {r['with']['seconds']:.2f} s |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds per scenario (CI smoke test)")
    parser.add_argument("--out", help="where to write the report (default: BENCHMARKS.md, or target/bench-quick.md)")
    parser.add_argument("--only", help="comma list of scenarios to run and print (no report is written)")
    args = parser.parse_args()
    if not os.path.exists(PYTHON):
        sys.exit("bench: .venv with the openai SDK not found; run scripts/install-test-deps")
    for tool in ["wrk", "nginx", "redis-server"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (Debian package {tool}; scripts/install-test-deps installs it)")
    log("bench: building release binaries")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "sluice", "--example", "sluice_sim",
                    "--example", "loadgen", "--example", "queue_hold", "--example", "h2_upstream"], cwd=ROOT, check=True)
    results = {}
    for name, scenario in [("overhead", overhead), ("memory", memory), ("limiter", limiter), ("persistent", persistent),
                           ("coldstart", coldstart), ("absorption", absorption), ("changing", changing_capacity),
                           ("streaming", streaming), ("h2", h2_streams), ("cache", cache), ("faults", faults), ("cluster", cluster)]:
        if args.only and name not in args.only.split(","):
            continue
        log(f"bench: {name}")
        started = time.monotonic()
        results[name] = scenario(args.quick)
        log(f"bench: {name} done in {time.monotonic() - started:.0f} s")
    if args.only:
        print(json.dumps(results, indent=2))
        return
    command = "python3 bench/run.py" + (" --quick" if args.quick else "")
    text = report(results, args.quick, command)
    out = args.out or (os.path.join(TARGET, "bench-quick.md") if args.quick else os.path.join(ROOT, "BENCHMARKS.md"))
    existing = open(out).read() if os.path.exists(out) and not args.quick else ""
    anchor = "## Where sluice's time goes"  # hand-written sections from here on are kept
    keep = existing[existing.find(anchor):] if anchor in existing else ""
    with open(out, "w") as f:
        f.write(text + ("\n" + keep if keep else ""))
    with open(os.path.join(TARGET, "bench-results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(text)
    log(f"bench: wrote {out}")


if __name__ == "__main__":
    main()
