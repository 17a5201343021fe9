#!/usr/bin/env bash
# Compile-checks the `cuda` feature on a machine with no GPU and no CUDA install: builds
# `wick --features cuda` (and clippy on it) against CUDA 13.0's compiler from NVIDIA's pip
# wheels, linking against stub libraries generated from cudarc's own symbol lists. The
# result links but cannot run (the stubs are no CUDA); running needs a GPU machine
# (scripts/gpu-check.sh).
#
# Everything it makes lives under $WICK_CUDA_CACHE (default ~/.cache/candlewick):
#   cuda-13.0/        venv with the nvcc/nvvm/crt/cudart/cccl wheels (reused when present)
#   cuda-13.0/stubs/  lib/lib{cuda,nvrtc,curand,cublas,cublasLt}.so stubs and libcudart.so
#   cuda-target/      the cargo target dir (never the CPU build's)
# Options: --no-clippy (build only); --lint-only (clippy only: every crate type-checked and
# linted, every build script run, so nvcc compiles all kernels, but no code generated or
# linked; what CI runs, in about half the time from empty). (scripts/gpu-bundle.sh builds
# what a GPU machine runs.)
# Cargo profile `cuda-check` (unoptimised, no debug info): build and clippy share its
# build-script outputs, so candle's kernels are compiled by nvcc once.
# Env: CUDA_COMPUTE_CAP (one value, for candle's kernels; default 75),
#      WICK_CUDA_ARCHS (our kernels/*.cu, comma list; default 75,86).
set -euo pipefail
cd "$(dirname "$0")/.."

clippy=1
build=1
for a in "$@"; do
    case "$a" in
        --no-clippy) clippy=0 ;;
        --lint-only) build=0 ;;
        *) echo "unknown option $a" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${WICK_CUDA_TARGET_DIR:-$cache/cuda-target}"
jobs="${CARGO_BUILD_JOBS:-2}"

t0=$SECONDS
if ((build)); then
    echo "== cargo build --profile cuda-check --features cuda (target $CARGO_TARGET_DIR)"
    cargo build -j"$jobs" --profile cuda-check --features cuda --bins --examples
    echo "   built in $((SECONDS - t0))s"
fi
if ((clippy)); then
    t1=$SECONDS
    echo "== cargo clippy --features cuda"
    cargo clippy -j"$jobs" --profile cuda-check --features cuda --all-targets -- -D warnings
    echo "   clippy in $((SECONDS - t1))s"
fi
echo "== cuda compile check passed in $((SECONDS - t0))s"
