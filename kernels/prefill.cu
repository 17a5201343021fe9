// Tiled prefill attention over the paged KV cache: causal, grouped-query heads, chunked
// prompts (a chunk attends to the cached prefix and causally within itself), any number of
// sequences per launch. fp16 in memory, fp32 arithmetic, plain FMAs (no bf16, no sm_80
// instructions: Turing runs it as is).
//
// Work: grid (tiles, kv_heads). A tile is up to `tokens` consecutive query tokens of one
// sequence; the block takes them for one KV head, with every query head of that KV head, so
// each K/V row it loads serves tokens x group query rows (at most PF_WARPS * 16). The block
// walks the keys its rows may see (window start of its first token to its last token's
// position) in tiles of PF_BK, staged in shared memory, with an online softmax per row.
//
// Lanes: two per query row (16 rows a warp). For the scores a lane takes half of the key
// tile's columns; for the output, half of the head's dimensions. Scores go through shared
// memory (one row of PF_BK per query row) from the first layout to the second.
//
// tiles: [tiles, 4] = (sequence, first token of the tile within the sequence's rows, tokens,
// 0); seq_info: [sequences, 4] = (first query row in the batch, rows, context length, 0). A
// row's position is context length - rows + its index, and it sees positions
// [position + 1 - window, position] (from 0 without a window). Both tables are validated on
// the host (src/model/cuda/ops.rs PagedMeta).
#include "common.cuh"

#define PF_WARPS 4
#define PF_ROWS_PER_WARP 16
#define PF_BK 32

template <int D>
__device__ __forceinline__ void prefill_impl(
    __half* __restrict__ out, const __half* __restrict__ q, int64_t q_stride,
    const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const uint32_t* __restrict__ block_tables, int max_blocks,
    const uint32_t* __restrict__ tiles, const uint32_t* __restrict__ seq_info, int num_heads,
    int num_kv_heads, int block_size, int window, float scale) {
    constexpr int ROWS = PF_WARPS * PF_ROWS_PER_WARP;
    constexpr int DH = D / 2;  // output dimensions per lane
    constexpr int QS = D + 2;  // padded row strides (halves): rows start in different banks
    constexpr int KS = D + 2;
    __shared__ __half Qs[ROWS * QS];
    __shared__ __half Ks[PF_BK * KS];
    __shared__ __half Vs[PF_BK * D];
    __shared__ float Ps[PF_WARPS][PF_ROWS_PER_WARP][PF_BK + 1];

    const int tile = blockIdx.x, kvh = blockIdx.y;
    const int seq = (int)tiles[tile * 4], tok0 = (int)tiles[tile * 4 + 1];
    const int ntok = (int)tiles[tile * 4 + 2];
    const int start = (int)seq_info[seq * 4], len = (int)seq_info[seq * 4 + 1];
    const int ctx = (int)seq_info[seq * 4 + 2];
    const int group = num_heads / num_kv_heads;
    const int first_pos = ctx - len;
    const uint32_t* bt = block_tables + (int64_t)seq * max_blocks;
    const int warp = threadIdx.x / WICK_WARP, lane = threadIdx.x % WICK_WARP;
    const int nrows = ntok * group;

    // The query rows: row r is token tok0 + r / group, head kvh * group + r % group.
    for (int i = threadIdx.x; i < ROWS * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        __half v = __float2half(0.f);
        if (r < nrows) {
            const int t = tok0 + r / group, h = kvh * group + r % group;
            v = q[(int64_t)(start + t) * q_stride + (int64_t)h * D + d];
        }
        Qs[r * QS + d] = v;
    }

    const int r_in_warp = lane / 2, half_idx = lane % 2;
    const int r = warp * PF_ROWS_PER_WARP + r_in_warp;
    const bool valid = r < nrows;
    const int t = tok0 + r / group;
    const int qpos = first_pos + t;
    const int qlo = (window > 0 && qpos + 1 > window) ? qpos + 1 - window : 0;

    const int first_tok_pos = first_pos + tok0;
    const int kv_lo = (window > 0 && first_tok_pos + 1 > window) ? first_tok_pos + 1 - window : 0;
    const int kv_hi = first_pos + tok0 + ntok;  // one past the last row's position

    float m = -INFINITY, l = 0.f;
    float o[DH];
#pragma unroll
    for (int j = 0; j < DH; ++j) o[j] = 0.f;

    for (int kv0 = (kv_lo / PF_BK) * PF_BK; kv0 < kv_hi; kv0 += PF_BK) {
        __syncthreads();  // the previous tile's K/V (and, first time, Q) fully written/read
        for (int i = threadIdx.x; i < PF_BK * D; i += blockDim.x) {
            const int c = i / D, d = i % D;
            const int p = kv0 + c;
            __half kv = __float2half(0.f), vv = __float2half(0.f);
            if (p < kv_hi) {
                const int64_t slot = (int64_t)bt[p / block_size] * block_size + p % block_size;
                const int64_t at = (slot * num_kv_heads + kvh) * D + d;
                kv = k_cache[at];
                vv = v_cache[at];
            }
            Ks[c * KS + d] = kv;
            Vs[c * D + d] = vv;
        }
        __syncthreads();

        // Scores of this lane's half of the columns.
        float s[PF_BK / 2];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < PF_BK / 2; ++j) {
            const int c = half_idx * (PF_BK / 2) + j;
            const int p = kv0 + c;
            float acc = 0.f;
            if (valid && p <= qpos && p >= qlo) {
                for (int d = 0; d < D; ++d) {
                    acc += __half2float(Qs[r * QS + d]) * __half2float(Ks[c * KS + d]);
                }
                acc *= scale;
            } else {
                acc = -INFINITY;
            }
            s[j] = acc;
            tile_max = fmaxf(tile_max, acc);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(WICK_FULL_MASK, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);
        // Nothing visible yet (m_new = -inf): keep everything at zero.
        const float alpha = m_new == -INFINITY ? 1.f : __expf(m - m_new);
        float tile_sum = 0.f;
#pragma unroll
        for (int j = 0; j < PF_BK / 2; ++j) {
            const float p = s[j] == -INFINITY ? 0.f : __expf(s[j] - m_new);
            tile_sum += p;
            Ps[warp][r_in_warp][half_idx * (PF_BK / 2) + j] = p;
        }
        tile_sum += __shfl_xor_sync(WICK_FULL_MASK, tile_sum, 1);
        l = l * alpha + tile_sum;
        m = m_new;
        __syncwarp();
#pragma unroll
        for (int j = 0; j < DH; ++j) o[j] *= alpha;
        for (int c = 0; c < PF_BK; ++c) {
            const float p = Ps[warp][r_in_warp][c];
            if (p != 0.f) {
#pragma unroll
                for (int j = 0; j < DH; ++j) {
                    o[j] += p * __half2float(Vs[c * D + half_idx * DH + j]);
                }
            }
        }
        __syncwarp();  // Ps is rewritten next tile
    }

    if (valid) {
        const int h = kvh * group + r % group;
        __half* dst = out + ((int64_t)(start + t) * num_heads + h) * D + half_idx * DH;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int j = 0; j < DH; ++j) dst[j] = __float2half(o[j] * inv);
    }
}

#define WICK_PREFILL_ATTENTION(D)                                                           \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * WICK_WARP)                       \
        wick_prefill_attention_d##D##_f16(                                                   \
            __half* out, const __half* q, int64_t q_stride, const __half* k_cache,           \
            const __half* v_cache, const uint32_t* block_tables, int max_blocks,             \
            const uint32_t* tiles, const uint32_t* seq_info, int num_heads, int num_kv_heads, \
            int block_size, int window, float scale) {                                       \
        prefill_impl<D>(out, q, q_stride, k_cache, v_cache, block_tables, max_blocks, tiles, \
                        seq_info, num_heads, num_kv_heads, block_size, window, scale);       \
    }

WICK_PREFILL_ATTENTION(64)
WICK_PREFILL_ATTENTION(96)
WICK_PREFILL_ATTENTION(128)
