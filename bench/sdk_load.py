"""The baseline for the absorption benchmark: the official openai SDK straight at the upstream, with its own
retries (max_retries=2, its default), no proxy. Closed loop: CLIENTS is a comma list of worker counts.
Prints the same JSON shape as examples/loadgen.rs.

Usage: sdk_load.py BASE_URL CLIENTS DURATION_S
"""

import asyncio
import json
import sys
import time

import openai


def percentiles(values):
    values = sorted(values)
    def at(q):
        if not values:
            return 0.0
        rank = min(max(int(-(-q * len(values) // 1)), 1), len(values))
        return values[rank - 1]
    mean = sum(values) / len(values) if values else 0.0
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999), "mean": mean}


async def main():
    base_url, clients, duration = sys.argv[1], [int(n) for n in sys.argv[2].split(",")], float(sys.argv[3])
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=2, timeout=60)
    completed = [0] * len(clients)
    statuses = {}
    totals = []
    end = time.monotonic() + duration

    async def worker(who):
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                await client.chat.completions.create(model="deepseek-v4-flash", messages=[{"role": "user", "content": "hello"}])
                completed[who] += 1
                totals.append((time.monotonic() - started) * 1000)
                statuses["200"] = statuses.get("200", 0) + 1
            except openai.APIStatusError as err:
                statuses[str(err.status_code)] = statuses.get(str(err.status_code), 0) + 1
            except openai.APIError as err:
                statuses[type(err).__name__] = statuses.get(type(err).__name__, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(worker(who) for who, workers in enumerate(clients) for _ in range(workers)))
    elapsed = time.monotonic() - started
    print(json.dumps({
        "elapsed_s": elapsed, "completed": sum(completed), "throughput_rps": sum(completed) / elapsed,
        "per_client": completed, "statuses": statuses, "total_ms": percentiles(totals),
    }))


asyncio.run(main())
