#!/usr/bin/env bash
# Builds, on a machine with Rust and no GPU, everything a bare GPU machine needs to check and
# measure wick in one go (scripts/gpu-check.sh there): at most 64 MiB, no Rust and no package
# registry needed on the other side.
#
#   scripts/gpu-bundle.sh OUT_DIR [--cpu]
#
# OUT_DIR gets:
#   bin/wick.xz, bin/gpu_check.xz, bin/serving.xz  release binaries, stripped and compressed
#       (`wick`; examples/gpu_check.rs: kernel checks and random-weight model generator;
#       benches/serving.rs: the HTTP load driver)
#   tokenizer.gguf   the Qwen2.5 tokenizer and chat template (from the test models), for the
#       random-weight models gpu-check.sh generates there
#   gpu-check.sh     the script to run there
#   MANIFEST         what was built, from which commit, for which GPUs
# With --cpu it bundles a CPU build instead (dev profile) so the same gpu-check.sh can be
# tried here with `gpu-check.sh --cpu`.
#
# GPU architectures: our kernels get SASS for $WICK_CUDA_ARCHS (default 75,86: T4, A10) plus
# PTX for newer; candle's quantized-matmul library takes one, $CUDA_COMPUTE_CAP (default 75).
# For another GPU (e.g. the workplace's H200: CUDA_COMPUTE_CAP=90 WICK_CUDA_ARCHS=75,86,90)
# set both. The CUDA toolkit comes from pip wheels (scripts/cuda-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu-bundle.sh OUT_DIR [--cpu]}"
cpu=0
[[ "${2:-}" == "--cpu" ]] && cpu=1
t0=$SECONDS
mkdir -p "$out/bin"
out="$(cd "$out" && pwd)"

models="${WICK_TEST_MODELS:-$HOME/.cache/candlewick/test-models}"
qwen="$models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
[[ -f "$qwen" ]] || scripts/fetch-test-models.sh >/dev/null

jobs="${CARGO_BUILD_JOBS:-2}"
if ((cpu)); then
    profile_dir=debug
    cargo build -j"$jobs" --bin wick --example gpu_check --bench serving
    target="${CARGO_TARGET_DIR:-target}"
else
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh
    export CARGO_TARGET_DIR="${WICK_BUNDLE_TARGET_DIR:-$cache/cuda-release-target}"
    target="$CARGO_TARGET_DIR"
    profile_dir=release
    cargo build -j"$jobs" --release --features cuda --bin wick --example gpu_check --bench serving
fi
serving="$(ls -t "$target/$profile_dir"/deps/serving-* 2>/dev/null | grep -v '\.d$' | head -1)"
[[ -x "$serving" ]] || { echo "no serving bench binary under $target/$profile_dir/deps" >&2; exit 1; }

for pair in "wick:$target/$profile_dir/wick" "gpu_check:$target/$profile_dir/examples/gpu_check" \
    "serving:$serving"; do
    name="${pair%%:*}"
    src="${pair#*:}"
    cp "$src" "$out/bin/$name"
    strip "$out/bin/$name"
    xz -T0 -6 -f "$out/bin/$name"
done
run_here=()
if ((!cpu)); then
    # The CUDA build links libcuda and friends, which this machine lacks; extracting the
    # tokenizer calls none of them, so the link stubs under their sonames let it run here.
    sonames="$(mktemp -d)"
    for f in "$stubs"/lib/lib*.so; do
        ln -s "$f" "$sonames/$(objdump -p "$f" | awk '/SONAME/ {print $2}')"
    done
    run_here=(env "LD_LIBRARY_PATH=$sonames")
fi
"${run_here[@]}" "$target/$profile_dir/examples/gpu_check" extract-tokenizer "$qwen" \
    "$out/tokenizer.gguf"
[[ -n "${sonames:-}" ]] && rm -rf "$sonames"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
chmod +x "$out/gpu-check.sh"
{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m)"
    if ((cpu)); then
        echo "device cpu (dev profile)"
    else
        echo "device cuda: SASS for our kernels ${WICK_CUDA_ARCHS}, candle's ${CUDA_COMPUTE_CAP}; CUDA 13.0"
    fi
} >"$out/MANIFEST"

size=$(du -sb "$out" | cut -f1)
echo "bundle $out: $((size / 1024 / 1024)) MiB in $((SECONDS - t0)) s"
ls -l "$out" "$out/bin"
if ((size > 64 * 1024 * 1024)); then
    echo "bundle is over 64 MiB" >&2
    exit 1
fi
