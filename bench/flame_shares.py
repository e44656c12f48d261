#!/usr/bin/env python3
"""Shares of sampled CPU time by component, from folded stacks (bench/flamegraph.sh with FOLDED=…), one
column per file: a stack counts towards every component whose pattern it contains (so columns do not
add up to 100 %).

    python3 bench/flame_shares.py before.folded after.folded
"""

import re
import sys

COMPONENTS = [
    ("TCP sends (`writev`, kernel included)", r"__GI___writev"),
    ("TCP reads (`recv`)", r"__libc_recv"),
    ("`epoll_wait`", r"epoll_wait"),
    ("futex (thread wake-ups)", r"futex"),
    ("allocator (glibc malloc / jemalloc)",
     r"(^|;)(_int_malloc|_int_free|malloc|cfree|__libc_free|__libc_malloc|malloc_consolidate|_int_realloc|realloc)(;|$)|_rjem_"),
    ("hyper HTTP/1 parse and encode (`proto::h1::role`)", r"hyper::proto::h1::role"),
    ("hyper-util's pooled client", r"hyper_util::client::legacy"),
    ("tracing-subscriber (log formatting)", r"tracing_subscriber"),
    ("sluice's log writer thread", r"^sluice-log;"),
    ("serde_json (the body's `model`)", r"serde_json"),
    ("sluice::admission", r"sluice::admission"),
]


def shares(path):
    total, hits = 0, [0] * len(COMPONENTS)
    with open(path) as f:
        for line in f:
            stack, _, weight = line.rstrip("\n").rpartition(" ")
            weight = int(weight)
            total += weight
            for i, (_, pattern) in enumerate(COMPONENTS):
                if re.search(pattern, stack):
                    hits[i] += weight
    return [100 * h / total for h in hits]


def main():
    columns = [shares(path) for path in sys.argv[1:]]
    print("| component | " + " | ".join(sys.argv[1:]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, (name, _) in enumerate(COMPONENTS):
        print(f"| {name} | " + " | ".join(f"{column[i]:.1f} %" for column in columns) + " |")


if __name__ == "__main__":
    main()
