#!/usr/bin/env bash
# What the portable floor costs: the single-sequence benchmark (benches/model.rs) built as
# released (x86-64-v3, .cargo/config.toml) and built for this machine's CPU
# (target-cpu=native, in its own target dir), alternated ROUNDS times in one run, since the
# machine is noisy. Prints each run's tokens per second.
# Usage: scripts/bench-portable.sh [THREADS [ROUNDS]]   (defaults 2 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
rounds="${2:-2}"
native_dir="${WICK_NATIVE_TARGET_DIR:-target/native}"
scripts/fetch-test-models.sh >/dev/null
bench() { # LABEL [env...]
    local label="$1"
    shift
    env "$@" WICK_NUM_THREADS="$threads" cargo bench --profile dev --bench model -- --noplot 2>&1 |
        awk -v l="$label" 'match($0, /[a-z0-9._-]+\/[a-z0-9_]+/) {name=substr($0, RSTART, RLENGTH)}
            /thrpt/ {print l, name, $0}'
}
# Build both first, so the timed runs only run.
cargo bench --profile dev --bench model --no-run >/dev/null 2>&1
RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR="$native_dir" \
    cargo bench --profile dev --bench model --no-run >/dev/null 2>&1
for r in $(seq "$rounds"); do
    bench "portable#$r"
    bench "native#$r" RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR="$native_dir"
done
