// RMSNorm with an optional fused residual add, one block per row:
//   if delta != null: stream[r] = fp16(stream[r] + delta[r])   (the residual stream, in place)
//   out[r] = fp16(stream[r] * rsqrt(mean(stream[r]^2) + eps) * weight)
// The mean is taken in fp32 over the fp16-rounded sums, so it matches an unfused add
// followed by a norm. Rows are contiguous with `hidden` elements.
#include "common.cuh"

extern "C" __global__ void wick_add_rms_norm_f16(__half* __restrict__ out,
                                                 __half* __restrict__ stream,
                                                 const __half* __restrict__ delta,
                                                 const __half* __restrict__ weight, int hidden,
                                                 float eps) {
    __shared__ float scratch[WICK_WARP];
    const int64_t row = (int64_t)blockIdx.x * hidden;
    __half* s = stream + row;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        __half v = s[i];
        if (delta != nullptr) {
            v = __float2half(__half2float(v) + __half2float(delta[row + i]));
            s[i] = v;
        }
        const float f = __half2float(v);
        ss += f * f;
    }
    ss = wick_block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[row + i] = __float2half(__half2float(s[i]) * inv * __half2float(weight[i]));
    }
}
