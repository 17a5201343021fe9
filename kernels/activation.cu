// SiLU-and-multiply for the SwiGLU feed-forward: out = silu(gate) * up, elementwise, fp16
// in and out, fp32 arithmetic. silu(g) = g / (1 + e^-g).
#include "common.cuh"

extern "C" __global__ void wick_silu_mul_f16(__half* __restrict__ out,
                                             const __half* __restrict__ gate,
                                             const __half* __restrict__ up, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = __half2float(gate[i]);
        out[i] = __float2half(g / (1.f + __expf(-g)) * __half2float(up[i]));
    }
}
