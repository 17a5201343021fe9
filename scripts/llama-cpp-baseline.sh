#!/usr/bin/env bash
# Reproducible llama.cpp CPU baseline to compare candlewick against.
# Builds llama-bench and llama-server (CPU only, Release, native arch) from the llama.cpp
# tree vendored in a pinned llama-cpp-python sdist from PyPI, into a cache dir.
# Usage:
#   scripts/llama-cpp-baseline.sh build                  build once (skipped when already built)
#   scripts/llama-cpp-baseline.sh bench GGUF [THREADS]   llama-bench pp128/tg64 tokens/s, markdown table
#   scripts/llama-cpp-baseline.sh server GGUF PORT [NP]  llama-server on 127.0.0.1:PORT, NP slots, foreground
# Cache dir: $WICK_BASELINE_DIR (default ~/.cache/candlewick/llama.cpp).
set -euo pipefail

LCP_VERSION=0.3.36 # llama-cpp-python release whose vendor/llama.cpp we build
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir="${WICK_BASELINE_DIR:-$HOME/.cache/candlewick/llama.cpp}"
bin="$dir/build/bin"
PY="${PYTHON:-python3}"

usage() { sed -n '5,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

ensure_tools() {
  local missing=() t
  for t in cmake g++ make; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ "${#missing[@]}" -eq 0 ] && return
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
}

build() {
  local args=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
  # ggml's AMX kernels die with SIGILL on our (AMX-capable) VMs: -march=native minus AMX.
  if [ "$(uname -m)" = x86_64 ]; then
    args+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  fi
  if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ] &&
    [ "$(cat "$dir/build/wick-args" 2>/dev/null)" = "${args[*]}" ]; then
    echo "llama.cpp baseline already built: $bin/llama-bench $bin/llama-server"
    return
  fi
  ensure_tools
  if [ ! -f "$dir/src/CMakeLists.txt" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # --no-binary for this package only: its build deps may come as wheels (metadata prep is quick).
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check \
      --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$LCP_VERSION"
    local sdist="$work/llama_cpp_python-$LCP_VERSION.tar.gz"
    echo "$LCP_SHA256  $sdist" | sha256sum --check --quiet
    mkdir -p "$work/src"
    tar -xzf "$sdist" -C "$work/src" --strip-components=3 "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
    mkdir -p "$dir"
    rm -rf "$dir/src"
    mv "$work/src" "$dir/src"
  fi
  rm -rf "$dir/build"
  cmake -S "$dir/src" -B "$dir/build" "${args[@]}"
  nice -n 10 cmake --build "$dir/build" --config Release -j2 --target llama-bench llama-server
  echo "${args[*]}" >"$dir/build/wick-args"
  echo "llama.cpp baseline built: $bin/llama-bench $bin/llama-server"
}

cmd="${1:-}"
case "$cmd" in
  build) build ;;
  bench)
    [ $# -ge 2 ] || usage
    build >&2
    "$bin/llama-bench" -m "$2" -t "${3:-2}" -p 128 -n 64 -r 3 -o md
    ;;
  server)
    [ $# -ge 3 ] || usage
    build >&2
    np="${4:-1}"
    exec "$bin/llama-server" -m "$2" -t 2 -np "$np" -c $((4096 * np)) --port "$3" --host 127.0.0.1
    ;;
  *) usage ;;
esac
