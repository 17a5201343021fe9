// reshape_and_cache: writes a step's new K and V rows into the paged cache.
//
// Cache layout (both K and V): [num_blocks, block_size, kv_heads, head_dim], fp16, so a slot
// `s = block * block_size + offset` holds one contiguous row of kv_heads * head_dim values.
// key/value: [tokens, kv_heads, head_dim] rows with a row stride (elements) so a view into a
// fused QKV projection works. slot_mapping[t] is the slot of token t (validated on the host
// against the cache: src/model/cuda/ops.rs PagedMeta).
#include "common.cuh"

extern "C" __global__ void wick_reshape_and_cache_f16(
    const __half* __restrict__ key, const __half* __restrict__ value,
    __half* __restrict__ k_cache, __half* __restrict__ v_cache,
    const uint32_t* __restrict__ slot_mapping, int row_len, int64_t key_stride,
    int64_t value_stride) {
    const int t = blockIdx.x;
    const uint32_t slot = slot_mapping[t];
    const __half* k = key + (int64_t)t * key_stride;
    const __half* v = value + (int64_t)t * value_stride;
    __half* kc = k_cache + (int64_t)slot * row_len;
    __half* vc = v_cache + (int64_t)slot * row_len;
    const bool aligned = ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
                           reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc)) &
                          3) == 0;
    if (aligned && (row_len & 1) == 0) {
        // Two values per load/store.
        const int pairs = row_len / 2;
        for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
            reinterpret_cast<__half2*>(kc)[i] = reinterpret_cast<const __half2*>(k)[i];
            reinterpret_cast<__half2*>(vc)[i] = reinterpret_cast<const __half2*>(v)[i];
        }
    } else {
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
            kc[i] = k[i];
            vc[i] = v[i];
        }
    }
}
