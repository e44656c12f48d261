"""CPU time sluice spends per request at a fixed rate (user + system, from /proc), with the added p50,
for variants side by side, interleaved:

    python3 bench/cpu.py '{"before": {"BIN": "/tmp/sluice-before"}, "after": {}}' [rounds] [rate]

Each variant is an environment for the release binary (as in ab.py; "BIN" names another binary).
Needs `python3 bench/run.py --only overhead` to have built the release binaries once. Linux only
(/proc); traffic stays on 127.0.0.1.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as b  # noqa: E402

variants = json.loads(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
rate = sys.argv[3] if len(sys.argv) > 3 else "1000"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of the process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


sim_proc, sim_port = b.sim("--latency", "0ms")
with sim_proc:
    procs = b.sluice_variants(sim_port, variants)
    for p, _ in procs.values():
        p.__enter__()
    try:
        direct = b.loadgen(sim_port, 5, "--rate", rate)["total_ms"]["p50"]
        for _, port in procs.values():
            b.loadgen(port, 1, "--rate", rate)  # warm-up
        res = {name: [] for name in procs}
        for _ in range(rounds):
            for name, (p, port) in procs.items():
                before = cpu_seconds(p.proc.pid)
                out = b.loadgen(port, 5, "--rate", rate)
                spent = cpu_seconds(p.proc.pid) - before
                done = sum(out["statuses"].values())
                res[name].append((round(spent / done * 1e6), round((out["total_ms"]["p50"] - direct) * 1000)))
    finally:
        for p, _ in procs.values():
            p.__exit__(None, None, None)
    for name, runs in res.items():
        cpu = ", ".join(str(c) for c, _ in runs)
        p50 = ", ".join(f"+{d}" for _, d in runs)
        print(f"{name:24} CPU µs per request: {cpu}   added p50 µs: {p50}")
