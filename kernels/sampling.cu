// Greedy sampling: the argmax of each row of logits, one block per row. Ties go to the
// lowest id and NaN never wins (as in the CPU sampler); a row with nothing above -inf
// gives id 0.
#include "common.cuh"

__device__ __forceinline__ void better(float& v, uint32_t& i, float ov, uint32_t oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ void argmax_impl(uint32_t* __restrict__ out,
                                            const T* __restrict__ logits, int vocab,
                                            int64_t row_stride) {
    __shared__ float sv[WICK_WARP];
    __shared__ uint32_t si[WICK_WARP];
    const T* row = logits + (int64_t)blockIdx.x * row_stride;
    float v = -INFINITY;
    uint32_t idx = 0xffffffffu;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = to_f32<T>(row[j]);
        if (x > v) {  // strictly: this thread's earlier (lower) id keeps a tie; NaN fails
            v = x;
            idx = (uint32_t)j;
        }
    }
#pragma unroll
    for (int o = WICK_WARP / 2; o > 0; o >>= 1) {
        better(v, idx, __shfl_xor_sync(WICK_FULL_MASK, v, o),
               __shfl_xor_sync(WICK_FULL_MASK, idx, o));
    }
    const int lane = threadIdx.x % WICK_WARP, warp = threadIdx.x / WICK_WARP;
    const int warps = (blockDim.x + WICK_WARP - 1) / WICK_WARP;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? sv[lane] : -INFINITY;
        idx = lane < warps ? si[lane] : 0xffffffffu;
#pragma unroll
        for (int o = WICK_WARP / 2; o > 0; o >>= 1) {
            better(v, idx, __shfl_xor_sync(WICK_FULL_MASK, v, o),
                   __shfl_xor_sync(WICK_FULL_MASK, idx, o));
        }
        if (lane == 0) out[blockIdx.x] = v == -INFINITY ? 0u : idx;
    }
}

extern "C" __global__ void wick_argmax_f32(uint32_t* out, const float* logits, int vocab,
                                           int64_t row_stride) {
    argmax_impl<float>(out, logits, vocab, row_stride);
}

extern "C" __global__ void wick_argmax_f16(uint32_t* out, const __half* logits, int vocab,
                                           int64_t row_stride) {
    argmax_impl<__half>(out, logits, vocab, row_stride);
}
