#!/usr/bin/env bash
# The one device script: on a GPU machine with nothing installed but the NVIDIA driver (and
# xz), from a bundle made by scripts/gpu-bundle.sh, within 8 minutes including its start:
#
#   0. the GPU's memory bandwidth (read and copy, through the machine's PyTorch if it has
#      one): the ceiling the decode speeds are compared with;
#   1. every kernel against its CPU reference on this GPU (the suite `cargo test` runs on the
#      CPU execution layer), and kernel timings;
#   2. random-weight models of the real Qwen2.5-0.5B and 7B shapes, fp16 and Q4_K, generated
#      here (no download), in the order 0.5B fp16, 7B Q4_K, 0.5B Q4_K, 7B fp16 (the speed
#      targets first) or as WICK_CHECK_MODELS="shape:dtype ..." lists them;
#   3. `wick serve --device cuda` on each: the boot self-check's verdict (kernels or reference
#      path, from the log, /api/ps and /metrics), then the streaming chat load at concurrency
#      1/8/32/64: output tok/s, TTFT and inter-token latency p50/p95;
#   4. peak GPU memory per model (nvidia-smi);
#   5. a markdown table of it all (results.md), ready to paste.
#
#   ./gpu-check.sh [--cpu] [--quick]
#
# --cpu tries the same flow on a CPU bundle (gpu-bundle.sh --cpu) with a tiny model shape;
# --quick: 0.5B fp16 only, concurrency 1 and 8. Output goes to $OUT (default ./out):
# results.md, kernels.log, one serve log per model, bench logs. The wick servers inherit the
# environment (WICK_KV_CACHE_BYTES=4294967296 sizes the KV cache as a 16-24 GB card would).
# Each step is bounded by a timeout and the whole run by a deadline (WICK_CHECK_DEADLINE
# seconds, default 450): what does not fit is reported as skipped. Exit status: 0 when every
# kernel check and self-check passed.
#
# With this workplace's device tool, from the repository root of a checkout that has the
# bundle in gpu-bundle/ (git-ignored; pass it with carry), its logs packed into one file
# (the tool returns at most 8):
#   run(command="R=$OUT; export OUT=/tmp/gc WICK_KV_CACHE_BYTES=4294967296;
#       gpu-bundle/gpu-check.sh; rc=$?; tar czf $R/gc.tgz -C /tmp/gc .; exit $rc",
#       carry=["gpu-bundle"], timeout_s=540)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cpu=0
quick=0
for a in "$@"; do
    case "$a" in
        --cpu) cpu=1 ;;
        --quick) quick=1 ;;
        *) echo "unknown option $a" >&2; exit 2 ;;
    esac
done
deadline=$((SECONDS + ${WICK_CHECK_DEADLINE:-450}))
out="${OUT:-$here/out}"
mkdir -p "$out"
work="$(mktemp -d)"
bin="$work/bin"
mkdir -p "$bin"
pids=()
cleanup() {
    # Only these: a bare `wait` would also wait for the `tee` below, which waits for us.
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
exec > >(tee "$out/gpu-check.log") 2>&1

left() { echo $((deadline - SECONDS)); }
status=0
results="$out/results.md"
: >"$results"

for f in "$here"/bin/*.xz; do
    xz -dc "$f" >"$bin/$(basename "$f" .xz)"
    chmod +x "$bin/$(basename "$f" .xz)"
done

if ((cpu)); then
    device=cpu
    models=(tiny:f16)
    levels=(1 8)
    tokens=8
    gpu_name="cpu ($(nproc) cores)"
else
    device=cuda
    # The issue's speed targets first (0.5B fp16, 7B Q4_K), so a short deadline still
    # measures them.
    models=(qwen2.5-0.5b:f16 qwen2.5-7b:q4_k qwen2.5-0.5b:q4_k qwen2.5-7b:f16)
    levels=(1 8 32 64)
    tokens=64
    # The CUDA 13 libraries wick links: the system's, else any nvidia/*/lib of the Python
    # packages (PyTorch cu13 wheels bring them).
    for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
        [[ -d "$d" ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
    if command -v python3 >/dev/null; then
        wheel_libs="$(python3 - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = set()
for root in nvidia.__path__:
    for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
EOF
)"
        [[ -n "$wheel_libs" ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$wheel_libs"
    fi
    missing="$(ldd "$bin/wick" | grep 'not found' || true)"
    if [[ -n "$missing" ]]; then
        echo "libraries not found for wick:"
        echo "$missing"
        exit 3
    fi
    gpu_name="$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
        --format=csv,noheader 2>/dev/null | head -1)"
fi
((quick)) && { models=("${models[0]}"); levels=(1 8); }
# WICK_CHECK_MODELS="shape:dtype ..." replaces the list (shapes: tiny, qwen2.5-0.5b, qwen2.5-7b;
# dtypes: f16, q4_k).
[[ -n "${WICK_CHECK_MODELS:-}" ]] && read -ra models <<<"$WICK_CHECK_MODELS"

echo "== $gpu_name; bundle: $(tr '\n' ';' <"$here/MANIFEST")"

# --- 0. the memory-bandwidth ceiling the speed figures are compared with: a 2 GiB read
# (a sum) and a copy, timed with CUDA events by the machine's PyTorch when it has one.
bandwidth="not measured (no python3 with torch)"
if [[ $device == cuda ]] && command -v python3 >/dev/null; then
    bandwidth="$(timeout 60 python3 - <<'EOF' 2>/dev/null
import torch
x = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
y = torch.empty_like(x)
def ms(f, n=20):
    for _ in range(3):
        f()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n
read = 2 * 2**30 / ms(lambda: x.sum(dtype=torch.float32)) / 1e6
copy = 2 * 2 * 2**30 / ms(lambda: y.copy_(x)) / 1e6
print(f"read {read:.0f} GB/s, copy {copy:.0f} GB/s (read + write)")
EOF
)" || bandwidth="not measured (the probe failed)"
fi
echo "== memory bandwidth: $bandwidth"

# --- 1. kernels
echo "== kernel checks"
t=$SECONDS
kdev=$([[ $device == cpu ]] && echo cpu || echo cuda:0)
# Seconds on a GPU; on the CPU execution layer (--cpu) minutes.
ktimeout=$([[ $device == cpu ]] && echo 900 || echo 150)
if timeout "$ktimeout" "$bin/gpu_check" kernels --device "$kdev" --bench >"$out/kernels.log" 2>&1; then
    kernels="passed"
else
    kernels="FAILED (exit $?)"
    status=1
fi
grep -E '^(FAIL|bench)|kernel check|compute capability' "$out/kernels.log"
kcount=$(grep -cE '^(ok|FAIL) ' "$out/kernels.log")
echo "   $kernels: $kcount comparisons in $((SECONDS - t)) s"

# --- GPU memory sampling (peak per model window)
mem_log="$work/mem.log"
if [[ $device == cuda ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem_log" 2>/dev/null &
    pids+=($!)
fi
peak_since() { # line count at window start -> peak MiB since then
    [[ -f "$mem_log" ]] || { echo "-"; return; }
    tail -n +"$(($1 + 1))" "$mem_log" | sort -n | tail -1
}

{
    echo "### wick GPU check: $gpu_name"
    echo
    echo "bundle: $(head -1 "$here/MANIFEST" | cut -c1-60); kernel checks: $kernels ($kcount comparisons)"
    echo
    echo "memory bandwidth (PyTorch, 2 GiB): $bandwidth"
    echo
    echo "| model | load s | self-check | conc | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | peak GPU MiB |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
} >>"$results"

# --- 2-4. models, serve, load
port=18434
for m in "${models[@]}"; do
    shape="${m%%:*}"
    dtype="${m#*:}"
    name="$shape-$dtype"
    if (($(left) < 60)); then
        echo "== $name: skipped (deadline)"
        echo "| $name | skipped: out of time | | | | | | | | |" >>"$results"
        continue
    fi
    echo "== $name"
    model="$work/$name.gguf"
    if ! timeout 180 "$bin/gpu_check" gen-model --shape "$shape" --dtype "$dtype" \
        --tokenizer "$here/tokenizer.gguf" --out "$model"; then
        echo "| $name | model generation failed | | | | | | | | |" >>"$results"
        status=1
        continue
    fi
    store="$work/store-$name"
    OLLAMA_MODELS="$store" "$bin/wick" import "$name" "$model" >/dev/null
    mem_start=$([[ -f "$mem_log" ]] && wc -l <"$mem_log" || echo 0)
    t=$SECONDS
    OLLAMA_MODELS="$store" OLLAMA_HOST="127.0.0.1:$port" RUST_LOG=info \
        "$bin/wick" serve --device "$device" >"$out/serve-$name.log" 2>&1 &
    server=$!
    pids+=($server)
    up=0
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && { up=1; break; }
        kill -0 "$server" 2>/dev/null || break
        sleep 0.2
    done
    if ((!up)); then
        echo "| $name | server did not start (see serve-$name.log) | | | | | | | | |" >>"$results"
        tail -5 "$out/serve-$name.log"
        status=1
        kill "$server" 2>/dev/null
        continue
    fi
    # Load the model (first request) and time it.
    t=$SECONDS
    curl -sf "http://127.0.0.1:$port/api/generate" \
        -d "{\"model\":\"$name\",\"prompt\":\"hi\",\"stream\":false,\"options\":{\"num_predict\":1}}" \
        >/dev/null
    load_s=$((SECONDS - t))
    check="$(grep -oE 'GPU self-check (passed|skipped)[^"]*|GPU SELF-CHECK FAILED' "$out/serve-$name.log" | head -1)"
    path="$(curl -sf "http://127.0.0.1:$port/api/ps" | grep -oE '"gpu_path":"[a-z]+"' | head -1 | cut -d'"' -f4)"
    [[ -z "$check" ]] && check="(none: cpu)"
    [[ "$check" == *FAILED* ]] && status=1
    echo "   loaded in ${load_s}s; self-check: $check; path: ${path:-n/a}"
    first=1
    while read -r line; do
        peak="$(peak_since "$mem_start")"
        if ((first)); then
            echo "| $name | $load_s | ${path:-cpu} | ${line#| }" | sed "s/ |\$/ | $peak |/" >>"$results"
            first=0
        else
            echo "| | | | ${line#| }" | sed "s/ |\$/ | $peak |/" >>"$results"
        fi
    done < <(WICK_BENCH_URL="http://127.0.0.1:$port" WICK_BENCH_MODEL="$name" \
        WICK_BENCH_TOKENS="$tokens" timeout "$(( $(left) > 30 ? $(left) - 20 : 10 ))" \
        "$bin/serving" "${levels[@]}" 2>"$out/bench-$name.err" | tee "$out/bench-$name.log" |
        grep -E '^\| [0-9]+ \|')
    curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^wick_gpu_path' >"$out/metrics-$name.txt" || true
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    rm -rf "$store" "$model"
done

{
    echo
    echo "Load: streaming /v1/chat/completions, $tokens output tokens a request, short chat prompts;"
    echo "tok/s is output tokens per second over all requests at that concurrency."
    echo "Random weights: the speed of the real shapes, not their text."
} >>"$results"
echo
cat "$results"
echo "gpu-check exit status $status ($((SECONDS)) s)"
exit "$status"
