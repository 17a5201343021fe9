#!/usr/bin/env bash
# Single-sequence prefill/decode speed of candlewick and llama.cpp on the same GGUF files and
# thread count, in one run (the machines are noisy: compare numbers from the same run only).
# Usage: scripts/bench-model.sh [THREADS]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
models="${WICK_TEST_MODELS:-$HOME/.cache/candlewick/test-models}"
scripts/fetch-test-models.sh >/dev/null
scripts/llama-cpp-baseline.sh build >/dev/null
echo "== llama.cpp (llama-bench, $threads threads)"
for m in SmolLM2-135M-Instruct.Q4_1.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
  gemma-3-270m-q4_k_m.gguf; do
  scripts/llama-cpp-baseline.sh bench "$models/$m" "$threads"
done
echo "== candlewick (criterion, $threads threads)"
# The bench profile has the release build's settings (what `cargo build --release` ships).
WICK_NUM_THREADS="$threads" cargo bench --bench model -- --noplot 2>&1 |
  grep -E '^[a-z0-9._-]+/|thrpt'
