# Sourced by scripts/cuda-compile-check.sh and scripts/gpu-bundle.sh: the CUDA 13.0 compiler
# from NVIDIA's pip wheels and link stubs generated from cudarc's symbol lists, so the
# `cuda` feature builds on a machine with no GPU and no CUDA install. Everything lives under
# $WICK_CUDA_CACHE (default ~/.cache/candlewick):
#   cuda-13.0/        venv with the nvcc/nvvm/crt/cudart/cccl wheels (reused when present)
#   cuda-13.0/stubs/  lib/lib{cuda,nvrtc,curand,cublas,cublasLt}.so stubs and libcudart.so
# Exports PATH (nvcc), CUDA_HOME/CUDA_PATH/CUDA_ROOT, CUDARC_CUDA_VERSION, CUDA_COMPUTE_CAP
# (candle's kernels, one value, default 75), WICK_CUDA_ARCHS (ours, default 75,86) and sets
# $cache for the caller.
cache="${WICK_CUDA_CACHE:-$HOME/.cache/candlewick}"
venv="$cache/cuda-13.0"
# The CUDA 13.0 toolkit pieces, pinned: PTX from a newer toolkit does not load on driver 580.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp="$venv/.wick-wheels"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${wheels[*]}" ]]; then
    echo "== installing CUDA 13.0 wheels into $venv"
    rm -rf "$venv"
    pip_install=(-m pip install --quiet --disable-pip-version-check --no-deps)
    if python3 -m venv "$venv" 2>/dev/null; then
        "$venv/bin/python" "${pip_install[@]}" "${wheels[@]}"
    else # no venv module (Debian without python3-venv): a plain target folder does too
        rm -rf "$venv"
        python3 "${pip_install[@]}" --target "$venv/site-packages" "${wheels[@]}"
    fi
    echo "${wheels[*]}" >"$stamp"
fi
cuda_root=""
for d in "$venv"/lib/python3*/site-packages/nvidia/cu13 "$venv"/site-packages/nvidia/cu13; do
    [[ -d "$d" ]] && { cuda_root="$d"; break; }
done
[[ -x "$cuda_root/bin/nvcc" ]] || { echo "no nvcc under $cuda_root" >&2; exit 1; }

# cudarc links (dynamic-linking, as candle asks for it) against these; the stubs carry the
# real sonames, so a binary linked here loads the real libraries on a GPU machine.
cudarc_ver="$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' Cargo.lock)"
cargo fetch --quiet
cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_ver" | head -1)"
stubs="$venv/stubs"
if [[ ! -f "$stubs/.cudarc-$cudarc_ver" ]]; then
    echo "== generating link stubs from cudarc $cudarc_ver"
    rm -rf "$stubs"
    mkdir -p "$stubs/lib" "$stubs/src"
    for spec in driver:cuda:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 curand:curand:libcurand.so.10 \
        cublas:cublas:libcublas.so.13 cublaslt:cublasLt:libcublasLt.so.13; do
        IFS=: read -r module lib soname <<<"$spec"
        c="$stubs/src/$lib.c"
        {
            echo "/* Link-time stub for $soname, generated from cudarc's $module bindings. */"
            grep -ohE 'pub unsafe fn [A-Za-z_][A-Za-z0-9_]*' "$cudarc_src/src/$module/sys/mod.rs" |
                awk '{print $4}' | sort -u | sed 's/.*/int &(void) { return 999; }/'
        } >"$c"
        cc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib/lib$lib.so" "$c"
    done
    ln -sf "$cuda_root/lib/libcudart.so.13" "$stubs/lib/libcudart.so"
    touch "$stubs/.cudarc-$cudarc_ver"
fi

export PATH="$cuda_root/bin:$PATH"
export CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root"
# cudarc adds <root>/lib of each of CUDA_HOME, CUDA_PATH, CUDA_ROOT to the link path.
export CUDA_ROOT="$stubs"
export CUDARC_CUDA_VERSION=13000
# candle-kernels 0.11 takes exactly one compute capability (its GGUF/MoE static library is
# SASS for that one); its PTX kernels JIT forward to newer GPUs.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-75}"
export WICK_CUDA_ARCHS="${WICK_CUDA_ARCHS:-75,86}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
