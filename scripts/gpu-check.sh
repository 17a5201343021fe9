#!/usr/bin/env bash
# Runs the CUDA kernel checks (examples/gpu_kernel_check.rs) on a machine with an NVIDIA GPU
# and no Rust: every kernel of kernels/*.cu against a CPU reference, printing the largest
# error of each; exits non-zero if one is out of tolerance.
#
# 1. Where Rust is (no GPU needed):
#        scripts/cuda-compile-check.sh --no-clippy --example-gpu-check
#    leaves the stripped binary in target-gpu-check/ (git-ignored, a few MiB).
# 2. On the GPU machine, from the repository root (carry target-gpu-check there):
#        scripts/gpu-check.sh [--bench] [--sanitize] [--device N]
#    --bench adds rough decode-attention timings; --sanitize runs it under
#    compute-sanitizer's memcheck too (slower). The log also goes to $OUT/gpu-check.log when
#    OUT is set.
#    With this workplace's device tool: run(command="scripts/gpu-check.sh --bench",
#    carry=["target-gpu-check"], timeout_s=300); the checks take seconds, most of a call is
#    the machine's start. The H100/H200 there JIT the sm_86 PTX: right for correctness, not
#    for T4/A10 timings.
#
# The binary links dynamically against the driver (libcuda.so.1) and CUDA 13's
# libcublas/libcublasLt/libcurand/libnvrtc/libcudart; they are taken from the system, else
# from the nvidia-* wheels of the machine's Python (PyTorch cu13 brings them).
set -uo pipefail
cd "$(dirname "$0")/.."

bin="${WICK_GPU_CHECK_BIN:-target-gpu-check/gpu_kernel_check}"
sanitize=0
args=()
for a in "$@"; do
    case "$a" in
        --sanitize) sanitize=1 ;;
        *) args+=("$a") ;;
    esac
done
if [[ ! -x "$bin" ]]; then
    echo "no $bin: build it with scripts/cuda-compile-check.sh --example-gpu-check and carry target-gpu-check" >&2
    exit 2
fi
log="${OUT:-/tmp}/gpu-check.log"
exec > >(tee "$log") 2>&1

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null ||
    echo "(nvidia-smi not found)"

# The CUDA 13 libraries: any nvidia/*/lib folder of the Python packages, ahead of the rest.
py="$(command -v python3 || true)"
if [[ -n "$py" ]]; then
    wheel_libs="$("$py" - <<'EOF' 2>/dev/null
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
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
missing="$(ldd "$bin" | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
    echo "libraries not found for $bin:"
    echo "$missing"
    exit 3
fi
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' | sed 's/^/  /'

status=0
"$bin" "${args[@]}" || status=$?
if ((sanitize)); then
    if command -v compute-sanitizer >/dev/null; then
        echo "== compute-sanitizer --tool memcheck"
        compute-sanitizer --tool memcheck --error-exitcode 9 "$bin" || status=$?
    else
        echo "(compute-sanitizer not found)"
    fi
fi
echo "gpu-check exit status $status"
exit "$status"
