// Sampling kernels: greedy argmax of each row (wick_argmax_*), and the full sampling chain
// (wick_sample_f32, below).
//
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

// ---------------------------------------------------------------------------------------
// Sampling on the device: one block per row of logits turns it into a token id, so only ids
// cross to the host. The chain is the CPU sampler's (src/engine/sampler.rs, llama.cpp's
// order): repetition/presence/frequency penalties -> top-k -> top-p (softmax before
// temperature) -> min-p -> temperature -> one draw; temperature <= 0 is greedy (argmax of
// the penalized logits, ties to the lowest id, NaN never wins). NaN counts as -inf and +inf
// as the largest float from top-k on, as on the CPU.
//
// Per row: fparams[8] = (temperature, top_p, min_p, repeat_penalty, presence, frequency, 0,
// 0); iparams[8] = (top_k, penalty offset, penalty count, seed lo, seed hi, step lo, step
// hi, 0). The penalty window of the row is pen_ids/pen_counts[offset .. offset + count]:
// distinct ids inside the vocabulary with their occurrences (validated on the host). The
// logits are penalized in place.
//
// top_k in 1..=1024 (the common case): the k best are found by radix selection on the
// logits' order-preserving bit patterns (ties at the cut to the lowest ids), gathered into
// shared memory and sorted best first; thread 0 then walks them exactly as the CPU sampler
// walks its sorted candidates (top-p prefix with f64 sums, min-p prefix, f32 weights summed
// in f64, inverse CDF). Otherwise the same cuts are found over the whole row by radix
// selection on counts and probability mass, and the draw walks the survivors in id order.
// The uniform number comes from the row's (seed, step) through splitmix64: a fixed seed
// replays the same tokens.

#define SAMPLE_THREADS 256
#define SAMPLE_SMALL_K 1024
#define WICK_FLT_MAX 3.402823466e+38f

__device__ __forceinline__ uint32_t sample_key(float v) {
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_sanitized(float v) {
    return v != v ? -INFINITY : (v == INFINITY ? WICK_FLT_MAX : v);
}

__device__ __forceinline__ double sample_uniform(unsigned long long seed,
                                                 unsigned long long step) {
    unsigned long long x = seed + 0x9E3779B97F4A7C15ull * (step + 1ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

// Block-wide reductions; every thread gets the result. `scratch` holds one value per warp.
__device__ __forceinline__ float sample_block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WICK_WARP, warp = threadIdx.x / WICK_WARP;
    const int warps = (blockDim.x + WICK_WARP - 1) / WICK_WARP;
    v = wick_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return wick_warp_max(v);
}

__device__ __forceinline__ double sample_block_sum(double v, double* scratch) {
    const int lane = threadIdx.x % WICK_WARP, warp = threadIdx.x / WICK_WARP;
    const int warps = (blockDim.x + WICK_WARP - 1) / WICK_WARP;
#pragma unroll
    for (int o = WICK_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(WICK_FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = WICK_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(WICK_FULL_MASK, v, o);
    return v;
}

// Whether token `i` (sanitized value `s`, key `k`) survived the cuts so far: key above
// `cut_key`, or equal to it with an id up to `cut_id`. (cut_key 0 and cut_id ~0: all.)
struct SampleCut {
    uint32_t key;
    uint32_t id;
};

__device__ __forceinline__ bool sample_in(const SampleCut& c, uint32_t k, uint32_t i) {
    return k > c.key || (k == c.key && i <= c.id);
}

// Radix selection, 8 bits a pass: among the tokens `in(i)` holds for, the key of the one at
// rank `rank` (1-based) counted from the largest key (by count when `mass` is null, else by
// the cumulative double weight w(i) reaching `rank`), and in `*rest` what is left of the rank
// within that key's ties. Then the id at the remaining rank among those ties, counted from
// the lowest id (by count, or for mass by the tie weight `tie_w`: ceil(rest / tie_w) ids).
template <typename In, typename W>
__device__ SampleCut sample_select(const float* L, int vocab, In in, W w, bool by_mass,
                                   double rank, unsigned* hist_n, double* hist_m,
                                   double* shared_d) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            hist_n[b] = 0;
            hist_m[b] = 0.0;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float s = sample_sanitized(L[i]);
            const uint32_t k = sample_key(s);
            if ((k & mask) == prefix && in(s, k, (uint32_t)i)) {
                const int b = (int)((k >> shift) & 255u);
                if (by_mass) {
                    atomicAdd(&hist_m[b], w(s));
                } else {
                    atomicAdd(&hist_n[b], 1u);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double cum = 0.0;
            int digit = 0;
            for (int b = 255; b >= 0; --b) {
                const double c = by_mass ? hist_m[b] : (double)hist_n[b];
                if (cum + c >= rank || b == 0) {
                    digit = b;
                    rank -= cum;
                    break;
                }
                cum += c;
            }
            shared_d[0] = rank;
            shared_d[1] = (double)digit;
        }
        __syncthreads();
        rank = shared_d[0];
        prefix |= (uint32_t)shared_d[1] << shift;
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t key = prefix;
    // Ties at `key`: how many of them, lowest ids first.
    double need = rank;
    if (by_mass) {
        // Every tie has the same weight, a function of the key alone.
        const float tv = __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
        const double tie_w = w(tv);
        need = tie_w > 0.0 ? ceil(rank / tie_w) : 1.0;
        if (need < 1.0) need = 1.0;
    }
    uint32_t id_prefix = 0, id_mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist_n[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float s = sample_sanitized(L[i]);
            const uint32_t k = sample_key(s);
            const uint32_t id = (uint32_t)i;
            if (k == key && (id & id_mask) == id_prefix && in(s, k, id)) {
                atomicAdd(&hist_n[(id >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double cum = 0.0;
            int digit = 255;
            for (int b = 0; b < 256; ++b) {
                if (cum + hist_n[b] >= need) {
                    digit = b;
                    need -= cum;
                    break;
                }
                cum += hist_n[b];
            }
            shared_d[0] = need;
            shared_d[1] = (double)digit;
        }
        __syncthreads();
        need = shared_d[0];
        id_prefix |= (uint32_t)shared_d[1] << shift;
        id_mask |= 255u << shift;
        __syncthreads();
    }
    return SampleCut{key, id_prefix};
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    wick_sample_f32(uint32_t* __restrict__ out, float* __restrict__ logits, int vocab,
                    int64_t row_stride, const float* __restrict__ fparams,
                    const uint32_t* __restrict__ iparams, const uint32_t* __restrict__ pen_ids,
                    const uint32_t* __restrict__ pen_counts) {
    __shared__ float scratch_f[WICK_WARP];
    __shared__ uint32_t scratch_u[WICK_WARP];
    __shared__ double scratch_d[WICK_WARP];
    __shared__ unsigned hist_n[256];
    __shared__ double hist_m[256];
    __shared__ float cand_v[SAMPLE_SMALL_K];
    __shared__ uint32_t cand_i[SAMPLE_SMALL_K];
    __shared__ unsigned cand_n;
    __shared__ double chunk_sum[SAMPLE_THREADS];

    const int row = blockIdx.x;
    float* L = logits + (int64_t)row * row_stride;
    const float* fp = fparams + (int64_t)row * 8;
    const uint32_t* ip = iparams + (int64_t)row * 8;
    const float temperature = fp[0], top_p = fp[1], min_p = fp[2];
    const float repeat = fp[3], presence = fp[4], frequency = fp[5];
    const int top_k = (int)ip[0];
    const uint32_t pen_off = ip[1], pen_n = ip[2];
    const unsigned long long seed = (unsigned long long)ip[3] | ((unsigned long long)ip[4] << 32);
    const unsigned long long step = (unsigned long long)ip[5] | ((unsigned long long)ip[6] << 32);

    // Penalties (llama.cpp): the repeat penalty pushes a logit towards less likely whatever
    // its sign; presence and frequency subtract.
    for (uint32_t j = threadIdx.x; j < pen_n; j += blockDim.x) {
        const uint32_t id = pen_ids[pen_off + j];
        float v = L[id];
        v = v <= 0.f ? v * repeat : v / repeat;
        v -= (float)pen_counts[pen_off + j] * frequency + presence;
        L[id] = v;
    }
    __syncthreads();

    if (!(temperature > 0.f)) {
        // Greedy: raw penalized logits, strictly greater wins (NaN never), ties to the lowest.
        float best = -INFINITY;
        uint32_t best_i = 0xffffffffu;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = L[i];
            if (v > best) {
                best = v;
                best_i = (uint32_t)i;
            }
        }
        const float m = sample_block_max(best, scratch_f);
        uint32_t cand = best == m ? best_i : 0xffffffffu;
        for (int o = WICK_WARP / 2; o > 0; o >>= 1) {
            cand = min(cand, __shfl_xor_sync(WICK_FULL_MASK, cand, o));
        }
        if (threadIdx.x % WICK_WARP == 0) scratch_u[threadIdx.x / WICK_WARP] = cand;
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t b = 0xffffffffu;
            for (int w = 0; w < (int)(blockDim.x + WICK_WARP - 1) / WICK_WARP; ++w) {
                b = min(b, scratch_u[w]);
            }
            out[row] = m == -INFINITY ? 0u : b;
        }
        return;
    }

    const double u = sample_uniform(seed, step);
    const SampleCut all = {0u, 0xffffffffu};
    auto any = [](float, uint32_t, uint32_t) { return true; };
    auto none_w = [](float) { return 0.0; };

    // top-k: the cut of the k best (lowest ids first among equal logits).
    SampleCut cut_k = all;
    const bool small = top_k > 0 && top_k < vocab && top_k <= SAMPLE_SMALL_K;
    if (top_k > 0 && top_k < vocab) {
        cut_k = sample_select(L, vocab, any, none_w, false, (double)top_k, hist_n, hist_m,
                              scratch_d);
    }

    if (small) {
        if (threadIdx.x == 0) cand_n = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float s = sample_sanitized(L[i]);
            if (sample_in(cut_k, sample_key(s), (uint32_t)i)) {
                const unsigned slot = atomicAdd(&cand_n, 1u);
                if (slot < SAMPLE_SMALL_K) {
                    cand_v[slot] = s;
                    cand_i[slot] = (uint32_t)i;
                }
            }
        }
        __syncthreads();
        const int n = (int)min(cand_n, (unsigned)SAMPLE_SMALL_K);
        int pow2 = 1;
        while (pow2 < n) pow2 <<= 1;
        for (int i = n + threadIdx.x; i < pow2; i += blockDim.x) {
            cand_v[i] = -INFINITY;
            cand_i[i] = 0xffffffffu;
        }
        __syncthreads();
        // Bitonic sort, best first: larger value, then lower id.
        for (int size = 2; size <= pow2; size <<= 1) {
            for (int stride = size / 2; stride > 0; stride >>= 1) {
                for (int i = threadIdx.x; i < pow2; i += blockDim.x) {
                    const int j = i ^ stride;
                    if (j > i) {
                        const bool desc = (i & size) == 0;
                        const float vi = cand_v[i], vj = cand_v[j];
                        const uint32_t ii = cand_i[i], ij = cand_i[j];
                        // Whether j should come before i in best-first order.
                        const bool j_better = vj > vi || (vj == vi && ij < ii);
                        if (j_better == desc) {
                            cand_v[i] = vj;
                            cand_v[j] = vi;
                            cand_i[i] = ij;
                            cand_i[j] = ii;
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (threadIdx.x == 0) {
            // The CPU sampler's walk over its sorted candidates.
            int kept = n;
            const float mx = cand_v[0];
            if (top_p < 1.f && mx != -INFINITY) {
                double total = 0.0;
                for (int i = 0; i < n; ++i) total += (double)expf(cand_v[i] - mx);
                const double target = (double)top_p * total;
                double acc = 0.0;
                kept = 0;
                for (int i = 0; i < n; ++i) {
                    acc += (double)expf(cand_v[i] - mx);
                    ++kept;
                    if (acc >= target) break;
                }
                if (kept < 1) kept = 1;
            }
            if (min_p > 0.f) {
                const float thr = mx + logf(min_p);
                int k2 = 0;
                while (k2 < kept && cand_v[k2] >= thr) ++k2;
                kept = k2;
            }
            uint32_t pick = kept > 0 ? cand_i[0] : 0u;
            if (kept > 0 && cand_v[0] != -INFINITY) {
                const float inv_t = 1.f / temperature;
                double total = 0.0;
                for (int i = 0; i < kept; ++i) total += (double)expf((cand_v[i] - mx) * inv_t);
                if (total > 0.0 && total <= 1.0e308) {
                    const double r = u * total;
                    double cum = 0.0;
                    for (int i = 0; i < kept; ++i) {
                        const float w = expf((cand_v[i] - mx) * inv_t);
                        if (w > 0.f) {
                            cum += (double)w;
                            pick = cand_i[i];
                            if (r < cum) break;
                        }
                    }
                }
            }
            out[row] = pick;
        }
        return;
    }

    // The whole row: maximum of the survivors of top-k.
    float mloc = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float s = sample_sanitized(L[i]);
        if (sample_in(cut_k, sample_key(s), (uint32_t)i)) mloc = fmaxf(mloc, s);
    }
    const float mx = sample_block_max(mloc, scratch_f);
    if (mx == -INFINITY) {
        if (threadIdx.x == 0) out[row] = 0u;
        return;
    }
    auto in_k = [&](float, uint32_t k, uint32_t i) { return sample_in(cut_k, k, i); };
    SampleCut cut_p = all;
    if (top_p < 1.f) {
        auto w = [&](float s) { return (double)expf(s - mx); };
        double part = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float s = sample_sanitized(L[i]);
            if (sample_in(cut_k, sample_key(s), (uint32_t)i)) part += w(s);
        }
        const double total = sample_block_sum(part, scratch_d);
        cut_p = sample_select(L, vocab, in_k, w, true, (double)top_p * total, hist_n, hist_m,
                              scratch_d);
    }
    const float thr = min_p > 0.f ? mx + logf(min_p) : -INFINITY;
    const float inv_t = 1.f / temperature;
    // Contiguous chunks of ids per thread, so the draw walks in id order.
    const int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int lo = (int)threadIdx.x * chunk, hi = min(vocab, lo + chunk);
    double part = 0.0;
    for (int i = lo; i < hi; ++i) {
        const float s = sample_sanitized(L[i]);
        const uint32_t k = sample_key(s);
        if (sample_in(cut_k, k, (uint32_t)i) && sample_in(cut_p, k, (uint32_t)i) && s >= thr) {
            part += (double)expf((s - mx) * inv_t);
        }
    }
    chunk_sum[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int t = 0; t < (int)blockDim.x; ++t) total += chunk_sum[t];
        const double r = u * total;
        // Skip whole chunks below r, then walk ids; rounding at the very top falls through
        // to the last survivor with a positive weight (as the CPU sampler does).
        double cum = 0.0;
        int t = 0;
        for (; t + 1 < (int)blockDim.x; ++t) {
            if (r < cum + chunk_sum[t]) break;
            cum += chunk_sum[t];
        }
        uint32_t pick = 0u;
        for (int i = t * chunk; i < vocab; ++i) {
            const float s = sample_sanitized(L[i]);
            const uint32_t k = sample_key(s);
            if (sample_in(cut_k, k, (uint32_t)i) && sample_in(cut_p, k, (uint32_t)i) && s >= thr) {
                const float w = expf((s - mx) * inv_t);
                if (w > 0.f) {
                    cum += (double)w;
                    pick = (uint32_t)i;
                    if (r < cum) break;
                }
            }
        }
        out[row] = pick;
    }
}
