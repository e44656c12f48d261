"""A/B of sluice variants side by side, in one run: saturation (wrk -t2 -c64, 5 s) and the latency added at
1,000 req/s over the simulator directly (loadgen, 5 s), with nginx's proxy_pass beside them.

    python3 bench/ab.py '{"before": {"BIN": "/tmp/sluice-before"}, "after": {}}' [rounds]

Each variant is an environment for the release binary (SLUICE_* settings, TOKIO_WORKER_THREADS, ...);
"BIN" names another binary to run instead. Needs `python3 bench/run.py --only overhead` to have built
the release binaries once. Traffic stays on 127.0.0.1.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as b  # noqa: E402

variants = json.loads(sys.argv[1])  # {"name": {"ENV": "v"}}
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
sim_proc, sim_port = b.sim("--latency", "0ms")
with sim_proc:
    procs = b.sluice_variants(sim_port, variants)
    n_proc, n_port = b.nginx(sim_port)
    for p, _ in procs.values():
        p.__enter__()
    with n_proc:
        ports = {"direct": sim_port, "nginx": n_port, **{k: v[1] for k, v in procs.items()}}
        for port in ports.values():
            b.wrk(port, 1)
        res = {k: {"rps": [], "p50": [], "p99": []} for k in ports}
        for _ in range(rounds):
            for name, port in ports.items():
                res[name]["rps"].append(round(b.wrk(port, 5)["rps"]))
                lat = b.loadgen(port, 5, "--rate", "1000")["total_ms"]
                res[name]["p50"].append(lat["p50"] * 1000)
                res[name]["p99"].append(lat["p99"] * 1000)
    for p, _ in procs.values():
        p.__exit__(None, None, None)
d50 = statistics.median(res["direct"]["p50"]); d99 = statistics.median(res["direct"]["p99"])
for name, r in res.items():
    print(f"{name:24} rps {r['rps']}  p50 +{statistics.median(r['p50']) - d50:.0f} us  p99 +{statistics.median(r['p99']) - d99:.0f} us")
