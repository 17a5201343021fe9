// Rotary position embedding in place, neox style (the halves of each head are rotated as
// pairs (i, i + head_dim/2)), the convention of candle's rope_thd that the decoder uses:
//   x[i]     = x[i] * cos[p, i] - x[i + h] * sin[p, i]
//   x[i + h] = x[i] * sin[p, i] + x[i + h] * cos[p, i]      with h = head_dim / 2
// q: [tokens, num_heads, head_dim], k: [tokens, num_kv_heads, head_dim] (fp16; token rows
// q_stride / k_stride elements apart), cos/sin: [max_positions, head_dim / 2] fp32,
// positions: [tokens]. One block per token.
#include "common.cuh"

__device__ __forceinline__ void rotate_pair(__half* x, int i, int half_dim, float c, float s) {
    const float a = __half2float(x[i]);
    const float b = __half2float(x[i + half_dim]);
    x[i] = __float2half(a * c - b * s);
    x[i + half_dim] = __float2half(a * s + b * c);
}

extern "C" __global__ void wick_rope_neox_f16(__half* __restrict__ q, __half* __restrict__ k,
                                              const float* __restrict__ cos_table,
                                              const float* __restrict__ sin_table,
                                              const uint32_t* __restrict__ positions,
                                              int num_heads, int num_kv_heads, int head_dim,
                                              int64_t q_stride, int64_t k_stride) {
    const int t = blockIdx.x;
    const int half_dim = head_dim / 2;
    const int64_t p = positions[t];
    const float* cs = cos_table + p * half_dim;
    const float* sn = sin_table + p * half_dim;
    const int q_pairs = num_heads * half_dim;
    const int all_pairs = (num_heads + num_kv_heads) * half_dim;
    for (int j = threadIdx.x; j < all_pairs; j += blockDim.x) {
        const bool is_q = j < q_pairs;
        const int jj = is_q ? j : j - q_pairs;
        const int head = jj / half_dim, i = jj % half_dim;
        __half* x = is_q ? q + t * q_stride + (int64_t)head * head_dim
                         : k + t * k_stride + (int64_t)head * head_dim;
        rotate_pair(x, i, half_dim, cs[i], sn[i]);
    }
}
