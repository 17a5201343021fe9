#!/bin/sh
# Entrypoint of the CUDA image (Dockerfile.cuda): listens on 0.0.0.0:$PORT (default 11434)
# unless OLLAMA_HOST says otherwise, and runs the wick build made for this GPU. The image
# carries one build per compute capability (/usr/local/lib/wick/wick-smNN) because candle's
# quantized-matmul kernels are machine code for one architecture; the newest build the GPU
# can run is chosen, else the newest one (its PTX kernels still JIT forward).
set -eu
export OLLAMA_HOST="${OLLAMA_HOST:-0.0.0.0:${PORT:-11434}}"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)"
best=""
best_n=0
newest=""
newest_n=0
for b in /usr/local/lib/wick/wick-sm*; do
    [ -x "$b" ] || continue
    n="${b##*-sm}"
    if [ "$n" -gt "$newest_n" ]; then newest="$b"; newest_n="$n"; fi
    case "$cap" in
        '' | *[!0-9]*) ;;
        *) if [ "$n" -le "$cap" ] && [ "$n" -gt "$best_n" ]; then best="$b"; best_n="$n"; fi ;;
    esac
done
[ -n "$best" ] || best="$newest"
[ -n "$best" ] || { echo "no wick build in /usr/local/lib/wick" >&2; exit 1; }
exec "$best" "$@"
