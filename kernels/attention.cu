// Paged decode attention with grouped-query heads, one query row at a time.
//
// Each listed query `qi` (one token: batch row query_row[qi] of q and out) attends over
// positions [lo, ctx) of its sequence, where ctx = query_ctx[qi] (the positions it may see,
// itself included) and lo = ctx - window under a sliding window. Keys and values are read
// from the paged cache [num_blocks, block_size, kv_heads, head_dim] (fp16) through the
// sequence's row of block_tables (row query_seq[qi]). Decode steps list one row per
// sequence; short prefill chunks may list one row per token (ctx = position + 1, causal);
// long chunks go to the tiled prefill kernel (prefill.cu), which writes the other rows.
//
// Grid: x = kv_heads * head_chunks, y = query rows, z = context partitions. One block takes
// one KV head and up to HEADS_PER_BLOCK of the query heads that share it, so each K/V row is
// read once for the whole group. Its warps walk the partition's positions round-robin with an
// online softmax in fp32 (running max m, sum l, unnormalized accumulator), then merge through
// shared memory.
//   * partition_size == 0: one partition, the result is normalized and written as fp16.
//   * partition_size > 0 (split-context): each partition writes its unnormalized fp32
//     accumulator plus (m, l), and wick_paged_attention_reduce combines the partitions.
#include "common.cuh"

#define HEADS_PER_BLOCK 8
#define ATTN_WARPS 4

template <int EPL>
__device__ __forceinline__ void load_row(const __half* __restrict__ p, float (&out)[EPL]) {
    if constexpr (EPL % 4 == 0) {
#pragma unroll
        for (int c = 0; c < EPL / 4; ++c) {
            const uint2 raw = reinterpret_cast<const uint2*>(p)[c];
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
            const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
            out[4 * c] = a.x;
            out[4 * c + 1] = a.y;
            out[4 * c + 2] = b.x;
            out[4 * c + 3] = b.y;
        }
    } else if constexpr (EPL % 2 == 0) {
#pragma unroll
        for (int c = 0; c < EPL / 2; ++c) {
            const float2 a = __half22float2(reinterpret_cast<const __half2*>(p)[c]);
            out[2 * c] = a.x;
            out[2 * c + 1] = a.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) out[e] = __half2float(p[e]);
    }
}

template <int EPL>
__device__ __forceinline__ void paged_attention_impl(
    __half* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,
    const __half* __restrict__ q, int64_t q_stride, const __half* __restrict__ k_cache,
    const __half* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
    int max_blocks, const uint32_t* __restrict__ query_seq,
    const uint32_t* __restrict__ query_ctx, const uint32_t* __restrict__ query_row,
    int num_heads, int num_kv_heads, int block_size, int window, float scale,
    int partition_size) {
    constexpr int D = EPL * WICK_WARP;
    __shared__ float sm_acc[ATTN_WARPS][HEADS_PER_BLOCK][D];
    __shared__ float sm_m[ATTN_WARPS][HEADS_PER_BLOCK];
    __shared__ float sm_l[ATTN_WARPS][HEADS_PER_BLOCK];

    const int group = num_heads / num_kv_heads;
    const int chunks = (group + HEADS_PER_BLOCK - 1) / HEADS_PER_BLOCK;
    const int kvh = blockIdx.x / chunks;
    const int head0 = kvh * group + (blockIdx.x % chunks) * HEADS_PER_BLOCK;
    const int nh = min(HEADS_PER_BLOCK, kvh * group + group - head0);
    const int qi = blockIdx.y;
    const int64_t qrow = query_row[qi];
    const int part = blockIdx.z;
    const int lane = threadIdx.x % WICK_WARP;
    const int warp = threadIdx.x / WICK_WARP;

    const int ctx = (int)query_ctx[qi];
    const int lo = (window > 0 && ctx > window) ? ctx - window : 0;
    int start = lo, end = ctx;
    if (partition_size > 0) {
        start = max(lo, part * partition_size);
        end = min(ctx, (part + 1) * partition_size);
    }
    const uint32_t* bt = block_tables + (int64_t)query_seq[qi] * max_blocks;

    float qr[HEADS_PER_BLOCK][EPL];
    float m[HEADS_PER_BLOCK], l[HEADS_PER_BLOCK], acc[HEADS_PER_BLOCK][EPL];
#pragma unroll
    for (int h = 0; h < HEADS_PER_BLOCK; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            acc[h][e] = 0.f;
            qr[h][e] = h < nh ? __half2float(q[qrow * q_stride + (int64_t)(head0 + h) * D +
                                                lane * EPL + e]) *
                                    scale
                              : 0.f;
        }
    }

    for (int p = start + warp; p < end; p += ATTN_WARPS) {
        const int64_t slot = (int64_t)bt[p / block_size] * block_size + p % block_size;
        const int64_t base = (slot * num_kv_heads + kvh) * D + lane * EPL;
        float kf[EPL], vf[EPL];
        load_row<EPL>(k_cache + base, kf);
        load_row<EPL>(v_cache + base, vf);
#pragma unroll
        for (int h = 0; h < HEADS_PER_BLOCK; ++h) {
            if (h < nh) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < EPL; ++e) s += qr[h][e] * kf[e];
                s = wick_warp_sum(s);
                const float mn = fmaxf(m[h], s);
                const float c = __expf(m[h] - mn);
                const float w = __expf(s - mn);
                l[h] = l[h] * c + w;
#pragma unroll
                for (int e = 0; e < EPL; ++e) acc[h][e] = acc[h][e] * c + w * vf[e];
                m[h] = mn;
            }
        }
    }

#pragma unroll
    for (int h = 0; h < HEADS_PER_BLOCK; ++h) {
        if (h < nh) {
#pragma unroll
            for (int e = 0; e < EPL; ++e) sm_acc[warp][h][lane * EPL + e] = acc[h][e];
            if (lane == 0) {
                sm_m[warp][h] = m[h];
                sm_l[warp][h] = l[h];
            }
        }
    }
    __syncthreads();

    for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
        const int h = i / D, d = i % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, sm_m[w][h]);
        float sum = 0.f, o = 0.f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; ++w) {
                const float f = __expf(sm_m[w][h] - mx);
                sum += sm_l[w][h] * f;
                o += sm_acc[w][h][d] * f;
            }
        }
        const int head = head0 + h;
        if (partition_size == 0) {
            out[(qrow * num_heads + head) * D + d] = __float2half(sum > 0.f ? o / sum : 0.f);
        } else {
            const int64_t row = ((int64_t)qi * num_heads + head) * gridDim.z + part;
            part_acc[row * D + d] = o;
            if (d == 0) {
                part_ml[row * 2] = mx;
                part_ml[row * 2 + 1] = sum;
            }
        }
    }
}

// Combines the partitions of the split-context variant: grid (num_heads, listed queries),
// out[query_row[qi], head, :] = sum_p acc_p * e^(m_p - M) / sum_p l_p * e^(m_p - M),
// M = max_p m_p.
template <int EPL>
__device__ __forceinline__ void paged_attention_reduce_impl(
    __half* __restrict__ out, const float* __restrict__ part_acc,
    const float* __restrict__ part_ml, const uint32_t* __restrict__ query_row,
    int num_partitions) {
    constexpr int D = EPL * WICK_WARP;
    const int head = blockIdx.x, qi = blockIdx.y, num_heads = gridDim.x;
    const int64_t row0 = ((int64_t)qi * num_heads + head) * num_partitions;
    float mx = -INFINITY;
    for (int p = 0; p < num_partitions; ++p) {
        if (part_ml[(row0 + p) * 2 + 1] > 0.f) mx = fmaxf(mx, part_ml[(row0 + p) * 2]);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f, o = 0.f;
        if (mx != -INFINITY) {
            for (int p = 0; p < num_partitions; ++p) {
                const float l = part_ml[(row0 + p) * 2 + 1];
                if (l > 0.f) {
                    const float f = __expf(part_ml[(row0 + p) * 2] - mx);
                    sum += l * f;
                    o += part_acc[(row0 + p) * D + d] * f;
                }
            }
        }
        out[((int64_t)query_row[qi] * num_heads + head) * D + d] =
            __float2half(sum > 0.f ? o / sum : 0.f);
    }
}

#define WICK_PAGED_ATTENTION(EPL, D)                                                          \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WICK_WARP)                       \
        wick_paged_attention_d##D##_f16(                                                       \
            __half* out, float* part_acc, float* part_ml, const __half* q, int64_t q_stride,   \
            const __half* k_cache, const __half* v_cache, const uint32_t* block_tables,        \
            int max_blocks, const uint32_t* query_seq, const uint32_t* query_ctx,              \
            const uint32_t* query_row, int num_heads, int num_kv_heads, int block_size,        \
            int window, float scale, int partition_size) {                                     \
        paged_attention_impl<EPL>(out, part_acc, part_ml, q, q_stride, k_cache, v_cache,       \
                                  block_tables, max_blocks, query_seq, query_ctx, query_row,  \
                                  num_heads, num_kv_heads, block_size, window, scale,         \
                                  partition_size);                                             \
    }                                                                                          \
    extern "C" __global__ void wick_paged_attention_reduce_d##D##_f16(                        \
        __half* out, const float* part_acc, const float* part_ml, const uint32_t* query_row,   \
        int num_partitions) {                                                                  \
        paged_attention_reduce_impl<EPL>(out, part_acc, part_ml, query_row, num_partitions);   \
    }

WICK_PAGED_ATTENTION(2, 64)
WICK_PAGED_ATTENTION(3, 96)
WICK_PAGED_ATTENTION(4, 128)
WICK_PAGED_ATTENTION(8, 256)
