/* The portable build's CPU floor, checked before anything else runs.
 *
 * wick is compiled for x86-64-v3 (.cargo/config.toml): any of its Rust code may use AVX2,
 * FMA, F16C or BMI instructions, so a check written in Rust could itself die with SIGILL on
 * an older CPU. This file is compiled for baseline x86-64 (build.rs) and linked into the
 * binaries only; its constructor runs before Rust's runtime and main, and on a CPU below the
 * floor prints why and exits instead of crashing on the first such instruction. */
#if defined(__x86_64__)
#include <cpuid.h>
#include <string.h>
#include <unistd.h>

static int has_x86_64_v3(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    unsigned leaf1 = c;
    /* FMA (12), MOVBE (22), POPCNT (23), OSXSAVE (27), AVX (28), F16C (29) */
    unsigned want1 = (1u << 12) | (1u << 22) | (1u << 23) | (1u << 27) | (1u << 28) | (1u << 29);
    if ((leaf1 & want1) != want1) return 0;
    /* The OS must save the YMM registers: XGETBV exists only once OSXSAVE is set. */
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 6) != 6) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    /* BMI1 (3), AVX2 (5), BMI2 (8) */
    unsigned want7 = (1u << 3) | (1u << 5) | (1u << 8);
    return (b & want7) == want7;
}

__attribute__((constructor)) static void wick_cpu_floor(void) {
    if (has_x86_64_v3()) return;
    static const char msg[] =
        "Error: this CPU lacks AVX2, FMA, F16C or BMI2, which this build of wick needs "
        "(it targets x86-64-v3: Intel Haswell, AMD Zen or newer)\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(1);
}
#endif
