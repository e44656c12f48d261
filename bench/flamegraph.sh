#!/bin/bash
# A flame graph of sluice under load: sluice (BIN, default the release build) in front of the simulator
# answering at once, wrk at saturation (2 threads, 32 connections, 10 s), perf sampling sluice's CPU
# (cpu-clock, 499 Hz, DWARF call stacks) for 6 s of it; inferno draws the SVG. Manual tool, not run by
# CI: needs perf (Debian linux-perf), wrk and inferno (`cargo install inferno`).
#
#   bash bench/flamegraph.sh OUT.svg [TITLE]    # BIN=/path/to/sluice profiles another build;
#                                                # FOLDED=/path keeps the folded stacks
set -euo pipefail
OUT=${1:?usage: bench/flamegraph.sh OUT.svg [TITLE]}
TITLE=${2:-sluice under wrk saturation (perf cpu-clock)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --locked --bin sluice --example sluice_sim >&2
BIN=${BIN:-target/release/sluice}
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port)
PORT=$(free_port)
target/release/examples/sluice_sim --listen "127.0.0.1:$SIM_PORT" --latency 0ms >/dev/null 2>&1 &
SIM_PID=$!
env -i PATH="$PATH" HOME="$HOME" SLUICE_LIMITS__ADAPTIVE=false SLUICE_LIMITS__MAX_CONCURRENCY=100000 \
    SLUICE_QUEUE__MAX_DEPTH=100000 SLUICE_LOG__LEVEL=info \
    "$BIN" --listen "127.0.0.1:$PORT" --upstream "http://127.0.0.1:$SIM_PORT" >/dev/null 2>&1 &
SLUICE_PID=$!
trap 'kill $SLUICE_PID $SIM_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
sleep 1.5
cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
LUA
URL="http://127.0.0.1:$PORT/v1/chat/completions"
wrk -t2 -c32 -d2s -s "$WORK/post.lua" "$URL" >/dev/null  # warm-up
wrk -t2 -c32 -d10s -s "$WORK/post.lua" "$URL" > "$WORK/wrk.txt" &
WRK_PID=$!
sleep 1
perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$SLUICE_PID" -o "$WORK/perf.data" -- sleep 6
wait $WRK_PID
grep "Requests/sec" "$WORK/wrk.txt" >&2
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "$WORK/folded"
inferno-flamegraph --minwidth 0.2 --title "$TITLE" < "$WORK/folded" > "$OUT"
if [ -n "${FOLDED:-}" ]; then cp "$WORK/folded" "$FOLDED"; fi
echo "wrote $OUT" >&2
