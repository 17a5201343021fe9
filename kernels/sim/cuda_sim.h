// The CPU execution layer for kernels/*.cu: maps the CUDA C++ that our kernels use onto
// plain C++, so that the system C++ compiler builds the very same sources nvcc builds and
// `cargo test` executes them with CUDA's semantics (build.rs; never in the `cuda` build).
//
// What it models, and how:
//  * A grid of blocks, run one after another; a block's threads are fibers on one OS thread
//    (sim.cpp), switched only at __syncthreads() and at warp operations, in a fixed order, so
//    every run is reproducible. A second order (last block and last thread first) exposes
//    missing barriers.
//  * __shared__ is `static thread_local`: one copy per OS thread, which runs one block at a
//    time, so it is per-block storage shared by that block's fibers. It is not cleared
//    between blocks (nor on the GPU); a block reading slots it did not write this time sees
//    another block's values, which the second order changes whenever blocks work on
//    different data.
//  * Warp shuffles, votes and __syncwarp over 32 lanes: each lane deposits its value and
//    waits; the last lane of the mask to arrive computes every lane's result.
//  * Barriers are checked: every thread of the block must reach the same __syncthreads()
//    (a thread that exited, or one waiting at another barrier, is an error), and a warp
//    operation's mask must name only live lanes that all arrive.
//  * __half is IEEE binary16 with the GPU's rounding: conversions and arithmetic round to
//    nearest even once (fp32 or exact intermediates), subnormals kept, overflow to inf.
//  * Atomics are read-modify-writes (fibers never interleave inside one).
// Deliberately absent, so that code needing them fails to compile here as it would fail on
// a T4: bf16 (cuda_bf16.h), sm_80+ intrinsics (__reduce_*_sync, __hmax, cp.async).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#define __CUDA_SIM__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---------------------------------------------------------------------------------------
// Built-in variables and vector types.

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

namespace wick_sim {
// The running fiber's indices, set by the scheduler before it resumes a fiber.
extern thread_local uint3 t_thread_idx;
extern thread_local uint3 t_block_idx;
extern thread_local dim3 t_block_dim;
extern thread_local dim3 t_grid_dim;
}  // namespace wick_sim

#define threadIdx (static_cast<const uint3&>(::wick_sim::t_thread_idx))
#define blockIdx (static_cast<const uint3&>(::wick_sim::t_block_idx))
#define blockDim (static_cast<const dim3&>(::wick_sim::t_block_dim))
#define gridDim (static_cast<const dim3&>(::wick_sim::t_grid_dim))
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// The runtime (sim.cpp).

namespace wick_sim {
enum WarpOp : int { OP_SHFL_IDX, OP_SHFL_XOR, OP_SHFL_DOWN, OP_SHFL_UP, OP_BALLOT, OP_SYNCWARP };

int barrier(int pred, int line, const char* file);
unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width, int line, const char* file);
unsigned active_mask();
[[noreturn]] void trap(const char* what, int line, const char* file);
unsigned long long clock();

template <typename T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
template <typename T>
inline T shfl(WarpOp op, int line, const char* file, unsigned mask, T v, int arg,
              int width = 32) {
    return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, line, file));
}
}  // namespace wick_sim

#define __syncthreads() ((void)::wick_sim::barrier(0, __LINE__, __FILE__))
#define __syncthreads_count(p) ::wick_sim::barrier((p) ? 1 : 0, __LINE__, __FILE__)
#define __syncthreads_and(p) \
    (::wick_sim::barrier((p) ? 1 : 0, __LINE__, __FILE__) == (int)(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(p) (::wick_sim::barrier((p) ? 1 : 0, __LINE__, __FILE__) != 0)
#define __shfl_sync(...) ::wick_sim::shfl(::wick_sim::OP_SHFL_IDX, __LINE__, __FILE__, __VA_ARGS__)
#define __shfl_xor_sync(...) \
    ::wick_sim::shfl(::wick_sim::OP_SHFL_XOR, __LINE__, __FILE__, __VA_ARGS__)
#define __shfl_down_sync(...) \
    ::wick_sim::shfl(::wick_sim::OP_SHFL_DOWN, __LINE__, __FILE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::wick_sim::shfl(::wick_sim::OP_SHFL_UP, __LINE__, __FILE__, __VA_ARGS__)
#define __ballot_sync(mask, p) \
    ((unsigned)::wick_sim::warp_op(::wick_sim::OP_BALLOT, (mask), (p) ? 1 : 0, 0, 32, __LINE__, __FILE__))
#define __any_sync(mask, p) (__ballot_sync((mask), (p)) != 0u)
#define __all_sync(mask, p) (__ballot_sync((mask), (p)) == (unsigned)(mask))
#define __syncwarp(...) \
    ((void)::wick_sim::warp_op(::wick_sim::OP_SYNCWARP, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 0xffffffffu, 0, 0, 32, __LINE__, __FILE__))
#define __activemask() ::wick_sim::active_mask()
#define __trap() ::wick_sim::trap("__trap()", __LINE__, __FILE__)
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)
#define clock64() ((long long)::wick_sim::clock())

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

// ---------------------------------------------------------------------------------------
// fp32 intrinsics (the GPU's fast versions are within a few ulp of these).

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.f : fminf(fmaxf(x, 0.f), 1.f); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int __float_as_int(float x) { return wick_sim::from_bits<int>(wick_sim::to_bits(x)); }
inline unsigned __float_as_uint(float x) {
    return wick_sim::from_bits<unsigned>(wick_sim::to_bits(x));
}
inline float __int_as_float(int x) { return wick_sim::from_bits<float>(wick_sim::to_bits(x)); }
inline float __uint_as_float(unsigned x) {
    return wick_sim::from_bits<float>(wick_sim::to_bits(x));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}

// CUDA's integer and floating min/max overloads (global, unqualified).
#define WICK_SIM_MINMAX(T)                          \
    inline T min(T a, T b) { return b < a ? b : a; } \
    inline T max(T a, T b) { return a < b ? b : a; }
WICK_SIM_MINMAX(int)
WICK_SIM_MINMAX(unsigned int)
WICK_SIM_MINMAX(long)
WICK_SIM_MINMAX(unsigned long)
WICK_SIM_MINMAX(long long)
WICK_SIM_MINMAX(unsigned long long)
#undef WICK_SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }

// ---------------------------------------------------------------------------------------
// fp16.

namespace wick_sim {
// Round-to-nearest-even to binary16 bits; exact for every input (v is at least as precise
// as the fp32 or exact fp16 arithmetic result it comes from). NaN -> 0x7fff, as the GPU's
// cvt.rn.f16 gives.
inline uint16_t f16_bits_of(double v) {
    if (v != v) return 0x7fff;
    const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
    const double a = std::fabs(v);
    if (a >= 65520.0) return sign | 0x7c00;  // 65520 is the tie between 65504 and inf
    if (a < 6.103515625e-05) {               // below 2^-14: subnormal, units of 2^-24
        return sign | (uint16_t)std::nearbyint(a * 16777216.0);
    }
    int e = std::ilogb(a);  // -14..15
    double m = std::nearbyint(std::ldexp(a, 10 - e));  // 1024..2048
    if (m >= 2048.0) {
        m = 1024.0;
        e += 1;
    }
    if (e > 15) return sign | 0x7c00;
    return sign | (uint16_t)((e + 15) << 10) | (uint16_t)((unsigned)m - 1024u);
}
inline float f32_of_f16_bits(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        const float v = (float)mant * 5.9604644775390625e-08f;  // mant * 2^-24, exact
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return from_bits<float>(bits);
}
}  // namespace wick_sim

struct alignas(2) __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(wick_sim::f16_bits_of(f)) {}
    __half(double d) : __x(wick_sim::f16_bits_of(d)) {}
    __half(int i) : __x(wick_sim::f16_bits_of((double)i)) {}
    operator float() const { return wick_sim::f32_of_f16_bits(__x); }
};
typedef __half half;
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half2 half2;

namespace wick_sim {
inline __half half_of_bits(uint16_t b) {
    __half h;
    h.__x = b;
    return h;
}
inline double dbl(__half h) { return (double)f32_of_f16_bits(h.__x); }
}  // namespace wick_sim

inline __half __float2half(float f) { return wick_sim::half_of_bits(wick_sim::f16_bits_of(f)); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return wick_sim::half_of_bits(wick_sim::f16_bits_of(d)); }
inline float __half2float(__half h) { return wick_sim::f32_of_f16_bits(h.__x); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return {__float2half(f.x), __float2half(f.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __half2 __float2half2_rn(float a) { return {__float2half(a), __float2half(a)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short b) { return wick_sim::half_of_bits(b); }
inline __half __short_as_half(short b) { return wick_sim::half_of_bits((uint16_t)b); }
inline bool __hisnan(__half h) { return (h.__x & 0x7c00) == 0x7c00 && (h.__x & 0x3ff) != 0; }
inline int __hisinf(__half h) {
    return (h.__x & 0x7fff) == 0x7c00 ? ((h.__x & 0x8000) ? -1 : 1) : 0;
}

// Arithmetic: the exact result of two fp16 operands (sum, difference, product) fits in a
// double, and double rounding through double is innocuous for +-*/ (53 >= 2*11+2), so each
// result is the correctly rounded fp16 the GPU's native fp16 units give.
inline __half __hadd(__half a, __half b) { return __double2half(wick_sim::dbl(a) + wick_sim::dbl(b)); }
inline __half __hsub(__half a, __half b) { return __double2half(wick_sim::dbl(a) - wick_sim::dbl(b)); }
inline __half __hmul(__half a, __half b) { return __double2half(wick_sim::dbl(a) * wick_sim::dbl(b)); }
inline __half __hdiv(__half a, __half b) { return __double2half(wick_sim::dbl(a) / wick_sim::dbl(b)); }
inline __half __hfma(__half a, __half b, __half c) {
    return __double2half(std::fma(wick_sim::dbl(a), wick_sim::dbl(b), wick_sim::dbl(c)));
}
inline __half __hneg(__half a) { return wick_sim::half_of_bits(a.__x ^ 0x8000); }
inline __half __habs(__half a) { return wick_sim::half_of_bits(a.__x & 0x7fff); }
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
inline bool __hne(__half a, __half b) { return __half2float(a) != __half2float(b); }
inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
inline bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
inline bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
inline __half operator-(const __half& a) { return __hneg(a); }

// ---------------------------------------------------------------------------------------
// Atomics: fibers switch only at barriers and warp operations, so a read-modify-write is
// never interleaved; __atomic builtins keep them correct if blocks ever run on parallel OS
// threads.

template <typename T>
inline T wick_sim_atomic_rmw(T* p, T (*f)(T, T), T v) {
    T old = *p;
    *p = f(old, v);
    return old;
}
#define WICK_SIM_ATOMIC_INT(T)                                                                 \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }      \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }      \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }    \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }      \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }        \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }      \
    inline T atomicMin(T* p, T v) {                                                           \
        return wick_sim_atomic_rmw<T>(p, [](T a, T b) { return b < a ? b : a; }, v);           \
    }                                                                                         \
    inline T atomicMax(T* p, T v) {                                                           \
        return wick_sim_atomic_rmw<T>(p, [](T a, T b) { return a < b ? b : a; }, v);           \
    }                                                                                         \
    inline T atomicCAS(T* p, T cmp, T v) {                                                    \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);   \
        return cmp;                                                                           \
    }
WICK_SIM_ATOMIC_INT(int)
WICK_SIM_ATOMIC_INT(unsigned int)
WICK_SIM_ATOMIC_INT(unsigned long long)
#undef WICK_SIM_ATOMIC_INT
inline long long atomicMin(long long* p, long long v) {
    return wick_sim_atomic_rmw<long long>(p, [](long long a, long long b) { return b < a ? b : a; }, v);
}
inline long long atomicMax(long long* p, long long v) {
    return wick_sim_atomic_rmw<long long>(p, [](long long a, long long b) { return a < b ? b : a; }, v);
}
inline float atomicAdd(float* p, float v) {
    return wick_sim_atomic_rmw<float>(p, [](float a, float b) { return a + b; }, v);
}
inline double atomicAdd(double* p, double v) {
    return wick_sim_atomic_rmw<double>(p, [](double a, double b) { return a + b; }, v);
}
inline float atomicExch(float* p, float v) {
    return wick_sim_atomic_rmw<float>(p, [](float, float b) { return b; }, v);
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    const unsigned old = *p;
    *p = old >= limit ? 0 : old + 1;
    return old;
}
inline __half2 atomicAdd(__half2* p, __half2 v) {
    const __half2 old = *p;
    *p = __hadd2(old, v);
    return old;
}
