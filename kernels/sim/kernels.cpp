// Every kernel of kernels/*.cu, compiled for the CPU execution layer and registered for
// wick_sim_launch. Each source is included as is (the same text nvcc compiles) inside a
// namespace of its own, as nvcc keeps each in a module of its own; a kernel that is not
// listed here cannot be launched on the CPU, and a test checks the list is complete.
#include "cuda_sim.h"
#include "sim_abi.h"
#include "common.cuh"

namespace wick_activation {
#include "activation.cu"
}
namespace wick_attention {
#include "attention.cu"
}
namespace wick_cache {
#include "cache.cu"
}
namespace wick_prefill {
#include "prefill.cu"
}
namespace wick_rms_norm {
#include "rms_norm.cu"
}
namespace wick_rotary {
#include "rotary.cu"
}
namespace wick_sampling {
#include "sampling.cu"
}
namespace wick_simtest {
#include "selftest.cu"
}

#define K(ns, name) ::wick_sim::entry(#name, &ns::name)

namespace wick_sim {

const KernelEntry* registry(size_t* n) {
    static const KernelEntry kernels[] = {
        K(wick_activation, wick_silu_mul_f16),
        K(wick_attention, wick_paged_attention_d64_f16),
        K(wick_attention, wick_paged_attention_d96_f16),
        K(wick_attention, wick_paged_attention_d128_f16),
        K(wick_attention, wick_paged_attention_d256_f16),
        K(wick_attention, wick_paged_attention_reduce_d64_f16),
        K(wick_attention, wick_paged_attention_reduce_d96_f16),
        K(wick_attention, wick_paged_attention_reduce_d128_f16),
        K(wick_attention, wick_paged_attention_reduce_d256_f16),
        K(wick_cache, wick_reshape_and_cache_f16),
        K(wick_prefill, wick_prefill_attention_d64_f16),
        K(wick_prefill, wick_prefill_attention_d96_f16),
        K(wick_prefill, wick_prefill_attention_d128_f16),
        K(wick_rms_norm, wick_add_rms_norm_f16),
        K(wick_rotary, wick_rope_neox_f16),
        K(wick_sampling, wick_argmax_f32),
        K(wick_sampling, wick_argmax_f16),
        K(wick_sampling, wick_sample_f32),
        // The layer's own tests (kernels/sim/selftest.cu).
        K(wick_simtest, wick_simtest_warp_ops),
        K(wick_simtest, wick_simtest_half),
        K(wick_simtest, wick_simtest_atomics),
        K(wick_simtest, wick_simtest_divergent_barrier),
        K(wick_simtest, wick_simtest_race),
        K(wick_simtest, wick_simtest_read_past_end),
        K(wick_simtest, wick_simtest_misaligned),
        K(wick_simtest, wick_simtest_shared_overflow),
        K(wick_simtest, wick_simtest_exited_lanes),
        K(wick_simtest, wick_simtest_writes_input),
    };
    *n = sizeof kernels / sizeof kernels[0];
    return kernels;
}

}  // namespace wick_sim
