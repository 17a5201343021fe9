// The CPU execution layer's launch interface (C ABI, called from Rust through
// src/model/cuda/sim.rs) and its kernel registry (kernels.cpp lists every kernel).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

extern "C" {
// Argument kinds. Pointers say how Rust hands the memory over: PTR_IN is read-only for the
// kernel (it must be a const parameter), PTR_OUT may be written, PTR_NULL is a null pointer.
enum { WICK_ARG_INT = 0, WICK_ARG_FLOAT = 1, WICK_ARG_PTR_IN = 2, WICK_ARG_PTR_OUT = 3, WICK_ARG_PTR_NULL = 4 };

// One kernel parameter, as cuLaunchKernel's kernelParams entry plus what it is, so the
// launch can check it against the kernel's C++ signature.
struct WickSimArg {
    const void* value;   // points at the argument's value
    uint32_t size;       // bytes of the value
    uint32_t kind;       // WICK_ARG_*
    uint32_t elem_size;  // pointers: bytes per element
    uint32_t reserved;
    const char* name;  // what it is, for messages (NUL-terminated)
    uint64_t lo, hi;   // pointers: the byte range [lo, hi) the kernel may touch
};

// Launch flags.
enum { WICK_SIM_REVERSE = 1 };

// Runs `kernel` over the grid; 0 on success, else non-zero with a message in `err`.
int wick_sim_launch(const char* kernel, const uint32_t grid[3], const uint32_t block[3],
                    const WickSimArg* args, size_t nargs, uint32_t flags, char* err,
                    size_t err_len);
// The registered kernels, for coverage checks: name of entry i (null past the end) and how
// often this process launched it.
const char* wick_sim_kernel_name(size_t i);
uint64_t wick_sim_launch_count(size_t i);
}

namespace wick_sim {

enum ParamKind : uint8_t { PARAM_INT, PARAM_FLOAT, PARAM_PTR };

struct ParamDesc {
    uint8_t kind;
    uint8_t is_const;  // pointers: the pointee is const
    uint32_t size;
    uint32_t elem_size;
};

using Thunk = void (*)(void (*)(), const void* const*);

struct KernelEntry {
    const char* name;
    void (*fn)();
    Thunk thunk;
    uint32_t nparams;
    const ParamDesc* params;
};

// Every kernel (kernels.cpp).
const KernelEntry* registry(size_t* n);

template <typename T>
struct Pointee {
    static constexpr uint32_t size = sizeof(T);
};
template <>
struct Pointee<void> {
    static constexpr uint32_t size = 0;
};
template <>
struct Pointee<const void> {
    static constexpr uint32_t size = 0;
};

template <typename T>
constexpr ParamDesc param_desc() {
    if constexpr (std::is_pointer<T>::value) {
        using P = typename std::remove_pointer<T>::type;
        return {PARAM_PTR, (uint8_t)std::is_const<P>::value, (uint32_t)sizeof(T),
                Pointee<P>::size};
    } else if constexpr (std::is_floating_point<T>::value) {
        return {PARAM_FLOAT, 0, (uint32_t)sizeof(T), 0};
    } else {
        static_assert(std::is_integral<T>::value, "kernel parameters are ints, floats or pointers");
        return {PARAM_INT, 0, (uint32_t)sizeof(T), 0};
    }
}

template <typename... A, size_t... I>
void call_with(void (*f)(A...), const void* const* v, std::index_sequence<I...>) {
    f(*static_cast<const typename std::remove_reference<A>::type*>(v[I])...);
}

template <typename... A>
void thunk(void (*f)(), const void* const* v) {
    call_with(reinterpret_cast<void (*)(A...)>(f), v, std::index_sequence_for<A...>{});
}

template <typename... A>
struct Params {
    static constexpr ParamDesc list[sizeof...(A) + 1] = {param_desc<A>()..., ParamDesc{}};
};

template <typename... A>
KernelEntry entry(const char* name, void (*f)(A...)) {
    return {name, reinterpret_cast<void (*)()>(f), &thunk<A...>, (uint32_t)sizeof...(A),
            Params<A...>::list};
}

}  // namespace wick_sim
