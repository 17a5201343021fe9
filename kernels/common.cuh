// Shared helpers for candlewick's kernels: fp16 storage, fp32 arithmetic, warp/block
// reductions. Only sm_75-level features (no bf16, no cp.async), so every file builds for
// Turing (T4) and runs unchanged on Ampere (A10) and later.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define WICK_WARP 32
#define WICK_FULL_MASK 0xffffffffu

__device__ __forceinline__ float wick_warp_sum(float v) {
#pragma unroll
    for (int o = WICK_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(WICK_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float wick_warp_max(float v) {
#pragma unroll
    for (int o = WICK_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(WICK_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp
// (at most 32). Must be called by all threads of the block.
__device__ __forceinline__ float wick_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WICK_WARP;
    const int warp = threadIdx.x / WICK_WARP;
    const int warps = (blockDim.x + WICK_WARP - 1) / WICK_WARP;
    v = wick_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return wick_warp_sum(v);
}
