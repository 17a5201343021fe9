#!/usr/bin/env bash
# Serving load benchmark of candlewick against llama.cpp's llama-server (continuous
# batching, -np 8) on the same GGUF files and thread count, in one run: the same streaming
# /v1/chat/completions workload (benches/serving.rs in HTTP mode) against each server in
# turn, with each server's peak resident memory, then candlewick's in-process engine for
# reference. llama-server gets -c 4096 per slot (-c 32768 for 8 slots), what a two-turn chat
# with a 300-token system prompt needs.
# Usage: scripts/bench-serving.sh [THREADS [CONCURRENCY ...]]   (default 2; 1 8 32)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
shift || true
levels=("${@:-1 8 32}")
# shellcheck disable=SC2206
levels=(${levels[*]})
models="${WICK_TEST_MODELS:-$HOME/.cache/candlewick/test-models}"
scripts/fetch-test-models.sh >/dev/null
scripts/llama-cpp-baseline.sh build >/dev/null
llama="${WICK_BASELINE_DIR:-$HOME/.cache/candlewick/llama.cpp}/build/bin/llama-server"
# The release build users run (README), and the bench (bench profile: release settings).
cargo build --release --bin wick 2>&1 | tail -1
cargo bench --bench serving --no-run 2>&1 | tail -1
wick="${CARGO_TARGET_DIR:-target}/release/wick"
work="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

wait_up() { # URL
  for _ in $(seq 1 600); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2
  exit 1
}

peak_rss() { # PID: the process's peak resident set (VmHWM), in MB
  awk '/^VmHWM:/ {printf "peak RSS: %.0f MB\n", $2 / 1024}' "/proc/$1/status"
}

drive() { # URL MODEL
  WICK_BENCH_URL="$1" WICK_BENCH_MODEL="$2" cargo bench --bench serving -- \
    "${levels[@]}" 2>"$work/bench.err" | grep -E '^\||second turn|tokens per request' ||
    { cat "$work/bench.err" >&2; exit 1; }
}

for m in SmolLM2-135M-Instruct.Q4_1.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  echo "=== $m, $threads threads"
  echo "--- llama.cpp llama-server -np 8"
  "$llama" -m "$models/$m" -t "$threads" -np 8 -c $((4096 * 8)) --port 18081 \
    --host 127.0.0.1 >"$work/llama.log" 2>&1 &
  pid=$!
  wait_up http://127.0.0.1:18081/health
  drive http://127.0.0.1:18081 "$m"
  peak_rss "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

  echo "--- candlewick wick serve"
  OLLAMA_MODELS="$work/store" "$wick" import bench "$models/$m" >/dev/null
  OLLAMA_MODELS="$work/store" OLLAMA_HOST=127.0.0.1:18082 WICK_NUM_THREADS="$threads" \
    RUST_LOG=warn "$wick" serve >"$work/wick.log" 2>&1 &
  pid=$!
  wait_up http://127.0.0.1:18082/
  drive http://127.0.0.1:18082 bench
  peak_rss "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  rm -rf "$work/store"

  echo "--- candlewick in process"
  WICK_NUM_THREADS="$threads" cargo bench --bench serving -- "$models/$m" \
    "${levels[@]}" 2>/dev/null | grep -E '^\||second turn'
done
