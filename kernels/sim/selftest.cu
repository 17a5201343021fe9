// Kernels that test the CPU execution layer itself (src/model/cuda/sim.rs tests): its warp
// operations, fp16 rounding and atomics against known answers, and deliberately broken
// kernels each check must catch. Compiled only for the layer, never by nvcc.
#include "common.cuh"

// out[op * n + t]: for every thread t, shuffles of `t * 10` with widths 32, 16 and 8, and a
// ballot of odd lanes: xor 5, down 3, up 3, idx 7 (width 32); xor 5, down 3, up 3, idx 7
// (width 16); the same for width 8; ballot; warp sum of t; block sum of t.
extern "C" __global__ void wick_simtest_warp_ops(int* out, int n) {
    const int t = threadIdx.x;
    const int v = t * 10;
    int k = 0;
    for (int width = 32; width >= 8; width /= 2) {
        out[(k++) * n + t] = __shfl_xor_sync(WICK_FULL_MASK, v, 5, width);
        out[(k++) * n + t] = __shfl_down_sync(WICK_FULL_MASK, v, 3, width);
        out[(k++) * n + t] = __shfl_up_sync(WICK_FULL_MASK, v, 3, width);
        out[(k++) * n + t] = __shfl_sync(WICK_FULL_MASK, v, 7, width);
    }
    out[(k++) * n + t] = (int)__ballot_sync(WICK_FULL_MASK, t & 1);
    out[(k++) * n + t] = (int)wick_warp_sum((float)t);
    __shared__ float scratch[WICK_WARP];
    out[(k++) * n + t] = (int)wick_block_sum((float)t, scratch);
    out[(k++) * n + t] = __syncthreads_count(t % 3 == 0);
}

// fp16 conversions and arithmetic: h[i] = fp16(x[i]); back[i] = float(h[i]);
// sum[i] = h[i] + h[i+1], prod[i] = h[i] * h[i+1] (fp16 arithmetic) for i < n - 1.
extern "C" __global__ void wick_simtest_half(__half* h, float* back, __half* sum, __half* prod,
                                             const float* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        h[i] = __float2half(x[i]);
        back[i] = __half2float(h[i]);
        if (i + 1 < n) {
            const __half a = __float2half(x[i]), b = __float2half(x[i + 1]);
            sum[i] = __hadd(a, b);
            prod[i] = __hmul(a, b);
        }
    }
}

// counters[0] += 1 per thread, counters[1] = max of global thread ids, counters[2] += id.
extern "C" __global__ void wick_simtest_atomics(unsigned int* counters) {
    const unsigned id = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(&counters[0], 1u);
    atomicMax(&counters[1], id);
    atomicAdd(&counters[2], id);
}

// Broken on purpose: only the first half of the block reaches the barrier.
extern "C" __global__ void wick_simtest_divergent_barrier(float* out) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
    out[threadIdx.x] = 1.f;
}

// Broken on purpose: reads a neighbour's shared slot with no barrier after the writes.
extern "C" __global__ void wick_simtest_race(float* out, const float* in) {
    __shared__ float s[256];
    const int base = blockIdx.x * blockDim.x;
    s[threadIdx.x] = in[base + threadIdx.x];
    out[base + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Broken on purpose: reads one element past the end of `in` (n elements).
extern "C" __global__ void wick_simtest_read_past_end(float* out, const float* in, int n) {
    out[threadIdx.x] = in[n + threadIdx.x];
}

// Broken on purpose: an 8-byte load from a 2-byte aligned address.
extern "C" __global__ void wick_simtest_misaligned(float* out, const __half* in) {
    const uint2 raw = *reinterpret_cast<const uint2*>(in + 1);
    out[threadIdx.x] = (float)raw.x;
}

// Broken on purpose: indexes a 32-entry shared array with up to blockDim.x - 1.
extern "C" __global__ void wick_simtest_shared_overflow(float* out) {
    __shared__ float s[32];
    s[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x % 32];
}

// Broken on purpose: lanes 16-31 return, the rest shuffle with a full mask.
extern "C" __global__ void wick_simtest_exited_lanes(float* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = wick_warp_sum(1.f);
}

// Broken on purpose: writes through a pointer the launch passes as an input (a const
// parameter cast away).
extern "C" __global__ void wick_simtest_writes_input(const float* in) {
    const_cast<float*>(in)[threadIdx.x] = 0.f;
}
