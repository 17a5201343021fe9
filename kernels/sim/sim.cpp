// The CPU execution layer's runtime: fibers, the per-block scheduler, checked barriers and
// warp operations, fault capture, and wick_sim_launch (called from Rust). See cuda_sim.h
// for what is modelled.
//
// A block's threads are fibers on the calling OS thread. A fiber runs until it reaches a
// barrier or a warp operation it cannot complete yet, then hands over to the next ready
// fiber in a fixed order (thread 0 first, or the last thread first with WICK_SIM_REVERSE).
// Whoever completes a barrier or warp operation (the last to arrive) releases the others;
// when nobody is ready and the block has not finished, the threads are deadlocked, which is
// reported with where each group of threads waits. Memory faults, traps of the UB checks
// that build.rs compiles in (-fsanitize=bounds,alignment,... in trap mode) and integer
// division faults inside a kernel end the launch with an error naming the block, the thread
// and, for faults next to an argument's memory, the argument.

#include <algorithm>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cuda_sim.h"
#include "sim_abi.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace wick_sim {

thread_local uint3 t_thread_idx;
thread_local uint3 t_block_idx;
thread_local dim3 t_block_dim;
thread_local dim3 t_grid_dim;

}  // namespace wick_sim

// ---------------------------------------------------------------------------------------
// Context switching. x86-64: the callee-saved registers and the SSE/x87 control words on the
// fiber's own stack, ~10 ns a switch. Elsewhere ucontext (correct, slower: it saves the
// signal mask with a system call).

extern "C" [[noreturn]] void wick_sim_fiber_entry();

#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void wick_sim_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .p2align 4
    .type wick_sim_switch,@function
wick_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size wick_sim_switch, .-wick_sim_switch
)");

namespace {
struct Fiber {
    void* sp = nullptr;
};

void fiber_init(Fiber& f, char* top) {
    uint64_t* p = reinterpret_cast<uint64_t*>(top);
    *--p = 0;  // the entry function's (never used) return address
    *--p = reinterpret_cast<uint64_t>(&wick_sim_fiber_entry);
    for (int i = 0; i < 6; ++i) *--p = 0;  // rbp, rbx, r12-r15
    uint32_t mxcsr;
    uint16_t fcw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fcw));
    *--p = (uint64_t)mxcsr | ((uint64_t)fcw << 32);
    f.sp = p;
}

inline void fiber_switch(Fiber& from, Fiber& to) { wick_sim_switch(&from.sp, to.sp); }
}  // namespace
#else
namespace {
struct Fiber {
    ucontext_t uc;
};

void fiber_entry_trampoline() { wick_sim_fiber_entry(); }

void fiber_init(Fiber& f, char* top, size_t size) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = top - size;
    f.uc.uc_stack.ss_size = size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry_trampoline, 0);
}

inline void fiber_switch(Fiber& from, Fiber& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace
#endif

namespace wick_sim {
namespace {

constexpr int WARP = 32;
constexpr size_t STACK_SIZE = 256 * 1024;

// Fiber stacks, one per thread of the largest block run so far on this OS thread, each
// above a guard page; reused by every launch.
struct Stacks {
    char* base = nullptr;
    size_t count = 0;
    size_t page = 0;
    size_t slot() const { return page + STACK_SIZE; }
    char* top(size_t i) const { return base + i * slot() + slot(); }
    bool in_guard(uintptr_t a) const {
        if (!base || a < (uintptr_t)base || a >= (uintptr_t)(base + count * slot())) return false;
        return (a - (uintptr_t)base) % slot() < page;
    }
    bool reserve(size_t n) {
        if (n <= count) return true;
        release();
        page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, n * slot(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return false;
        base = static_cast<char*>(p);
        count = n;
        for (size_t i = 0; i < n; ++i) mprotect(base + i * slot(), page, PROT_NONE);
        return true;
    }
    void release() {
        if (base) munmap(base, count * slot());
        base = nullptr;
        count = 0;
    }
    ~Stacks() { release(); }
};

enum class St : uint8_t { Ready, Barrier, Warp, Done };

struct Thread {
    Fiber fiber;
    St st = St::Ready;
    uint3 idx{};
    // The last barrier or warp operation this thread reached (where it waits, when it does).
    int line = 0;
    const char* file = "";
    int op = -1;  // WarpOp while waiting at one, -1 at a barrier
};

struct Warp {
    unsigned exists = 0;   // lanes this block has
    unsigned exited = 0;   // lanes that returned
    unsigned mask = 0;     // the open operation's mask (0: none open)
    unsigned arrived = 0;  // lanes of it that arrived
    int op = 0;
    unsigned long long in[WARP];
    int arg[WARP];
    int width[WARP];
    unsigned long long out[WARP];
};

const char* op_name(int op) {
    switch (op) {
        case OP_SHFL_IDX: return "__shfl_sync";
        case OP_SHFL_XOR: return "__shfl_xor_sync";
        case OP_SHFL_DOWN: return "__shfl_down_sync";
        case OP_SHFL_UP: return "__shfl_up_sync";
        case OP_BALLOT: return "__ballot_sync";
        case OP_SYNCWARP: return "__syncwarp";
        default: return "__syncthreads";
    }
}

const char* base_name(const char* path) {
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

struct Run {
    const KernelEntry* k = nullptr;
    const void* const* values = nullptr;
    const WickSimArg* args = nullptr;
    size_t nargs = 0;
    dim3 grid, block;
    int n = 0;
    bool reverse = false;
    std::vector<Thread> th;
    std::vector<Warp> warps;
    int cur = 0, ready = 0, done = 0;
    int bar_arrived = 0, bar_line = 0, bar_count = 0, bar_result = 0;
    const char* bar_file = "";
    Fiber main;
    volatile bool running = false;  // fibers execute: a fault is the kernel's
    bool failed = false;
    char msg[2048];
    sigjmp_buf jmp;
};

thread_local Run t_run_storage;
thread_local Run* t_run = nullptr;
thread_local Stacks t_stacks;

void appendf(char* buf, size_t cap, const char* fmt, ...) {
    const size_t len = strnlen(buf, cap);
    if (len + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + len, cap - len, fmt, ap);
    va_end(ap);
}

void where(Run& r, char* buf, size_t cap) {
    const uint3& b = t_block_idx;
    appendf(buf, cap, "%s: block (%u,%u,%u)", r.k->name, b.x, b.y, b.z);
}

int find_ready(Run& r, int from) {
    const int step = r.reverse ? r.n - 1 : 1;
    for (int k = 1, i = (from + step) % r.n; k <= r.n; ++k, i = (i + step) % r.n) {
        if (r.th[i].st == St::Ready) return i;
    }
    return -1;
}

// The current fiber cannot go on (waits or exited): run the next ready one, or go back to
// the scheduler when there is none. Returns when someone makes this fiber ready again.
void hand_over() {
    Run& r = *t_run;
    const int me = r.cur;
    const int next = r.ready > 0 ? find_ready(r, me) : -1;
    if (next < 0) {
        fiber_switch(r.th[me].fiber, r.main);
    } else {
        r.cur = next;
        t_thread_idx = r.th[next].idx;
        fiber_switch(r.th[me].fiber, r.th[next].fiber);
    }
}

// Ends the launch from inside a fiber with a message; never returns.
[[noreturn]] void fail(const char* fmt, ...) {
    Run& r = *t_run;
    r.msg[0] = 0;
    where(r, r.msg, sizeof r.msg);
    const uint3& t = r.th[r.cur].idx;
    appendf(r.msg, sizeof r.msg, " thread (%u,%u,%u): ", t.x, t.y, t.z);
    const size_t len = strlen(r.msg);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r.msg + len, sizeof r.msg - len, fmt, ap);
    va_end(ap);
    r.failed = true;
    fiber_switch(r.th[r.cur].fiber, r.main);
    abort();  // never resumed
}

// "threads 0-31 at __shfl_xor_sync (common.cuh:14); threads 32-127 exited"
void describe_threads(Run& r, char* buf, size_t cap) {
    int i = 0;
    while (i < r.n) {
        const Thread& a = r.th[i];
        int j = i + 1;
        while (j < r.n && r.th[j].st == a.st && r.th[j].line == a.line &&
               r.th[j].file == a.file && r.th[j].op == a.op) {
            ++j;
        }
        appendf(buf, cap, "%sthreads %d-%d ", i ? "; " : "", i, j - 1);
        switch (a.st) {
            case St::Done: appendf(buf, cap, "exited"); break;
            case St::Ready: appendf(buf, cap, "ready"); break;
            default:
                appendf(buf, cap, "wait at %s (%s:%d)", op_name(a.op), base_name(a.file), a.line);
        }
        i = j;
    }
}

[[noreturn]] void fail_divergent_barrier(Run& r) {
    char detail[1024] = "";
    describe_threads(r, detail, sizeof detail);
    fail("divergent __syncthreads(): every thread of a block must reach the same barrier (%s)",
         detail);
}

}  // namespace

int barrier(int pred, int line, const char* file) {
    Run& r = *t_run;
    Thread& me = r.th[r.cur];
    me.line = line;
    me.file = file;
    me.op = -1;
    if (r.bar_arrived == 0) {
        r.bar_line = line;
        r.bar_file = file;
        r.bar_count = 0;
    }
    if (r.done > 0 || r.bar_line != line || strcmp(r.bar_file, file) != 0) {
        me.st = St::Barrier;
        fail_divergent_barrier(r);
    }
    r.bar_count += pred;
    if (++r.bar_arrived == r.n) {
        // The last one: release everybody.
        for (Thread& t : r.th) t.st = St::Ready;
        r.ready = r.n;
        r.bar_arrived = 0;
        r.bar_result = r.bar_count;
        return r.bar_result;
    }
    me.st = St::Barrier;
    --r.ready;
    hand_over();
    return r.bar_result;
}

unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width, int line, const char* file) {
    Run& r = *t_run;
    const int t = r.cur, lane = t % WARP;
    Thread& me = r.th[t];
    Warp& w = r.warps[t / WARP];
    me.line = line;
    me.file = file;
    me.op = op;
    if (!((mask >> lane) & 1u)) {
        fail("%s (%s:%d) with mask 0x%08x, which leaves out the calling lane %d", op_name(op),
             base_name(file), line, mask, lane);
    }
    if (width <= 0 || width > WARP || (width & (width - 1)) != 0) {
        fail("%s (%s:%d): width %d is not a power of two up to 32", op_name(op), base_name(file),
             line, width);
    }
    if (w.arrived == 0) {
        if (mask & ~w.exists) {
            fail("%s (%s:%d) with mask 0x%08x names lanes this block does not have (0x%08x)",
                 op_name(op), base_name(file), line, mask, mask & ~w.exists);
        }
        if (mask & w.exited) {
            fail("%s (%s:%d) with mask 0x%08x names lanes that already exited (0x%08x)",
                 op_name(op), base_name(file), line, mask, mask & w.exited);
        }
        w.mask = mask;
        w.op = op;
    } else if (w.mask != mask || w.op != op) {
        fail("%s (%s:%d) with mask 0x%08x meets %s with mask 0x%08x in the same warp: lanes "
             "disagree on the warp operation",
             op_name(op), base_name(file), line, mask, op_name(w.op), w.mask);
    }
    w.in[lane] = value;
    w.arg[lane] = arg;
    w.width[lane] = width;
    w.arrived |= 1u << lane;
    if (w.arrived == w.mask) {
        // The last lane of the mask: every lane's result.
        unsigned ballot = 0;
        for (int l = 0; l < WARP; ++l) {
            if ((w.mask >> l) & 1u && w.in[l]) ballot |= 1u << l;
        }
        for (int l = 0; l < WARP; ++l) {
            if (!((w.mask >> l) & 1u)) continue;
            const int wd = w.width[l], seg = l & ~(wd - 1), a = w.arg[l];
            int src = l;
            switch (op) {
                case OP_SHFL_IDX: src = seg + (a & (wd - 1)); break;
                case OP_SHFL_XOR: src = (l ^ a) < seg + wd ? (l ^ a) : l; break;
                case OP_SHFL_DOWN: src = l + a < seg + wd ? l + a : l; break;
                case OP_SHFL_UP: src = l - a >= seg ? l - a : l; break;
                default: break;
            }
            if (op == OP_BALLOT) {
                w.out[l] = ballot;
            } else if (op == OP_SYNCWARP) {
                w.out[l] = 0;
            } else {
                if (src < 0 || src >= WARP || !((w.mask >> src) & 1u)) {
                    fail("%s (%s:%d): lane %d reads lane %d, which is not in the mask 0x%08x "
                         "(undefined on the GPU)",
                         op_name(op), base_name(file), line, l, src, w.mask);
                }
                w.out[l] = w.in[src];
            }
        }
        const int base = t - lane;
        for (int l = 0; l < WARP; ++l) {
            if (l != lane && ((w.mask >> l) & 1u)) {
                r.th[base + l].st = St::Ready;
                ++r.ready;
            }
        }
        w.arrived = 0;
        w.mask = 0;
        return w.out[lane];
    }
    me.st = St::Warp;
    --r.ready;
    hand_over();
    return w.out[lane];
}

unsigned active_mask() {
    Run& r = *t_run;
    const Warp& w = r.warps[r.cur / WARP];
    return w.exists & ~w.exited;
}

void trap(const char* what, int line, const char* file) {
    fail("%s at %s:%d", what, base_name(file), line);
}

unsigned long long clock() {
    static thread_local unsigned long long c = 0;
    return c += 1000;
}

}  // namespace wick_sim

using namespace wick_sim;

extern "C" void wick_sim_fiber_entry() {
    Run& r = *t_run;
    r.k->thunk(r.k->fn, r.values);
    // The kernel returned for this thread.
    Thread& me = r.th[r.cur];
    me.st = St::Done;
    me.op = -2;
    me.line = 0;
    me.file = "";
    ++r.done;
    --r.ready;
    Warp& w = r.warps[r.cur / WARP];
    const unsigned bit = 1u << (r.cur % WARP);
    w.exited |= bit;
    if (w.arrived != 0 && (w.mask & bit)) {
        fail("exited while lanes of its warp wait for it at %s (mask 0x%08x)", op_name(w.op),
             w.mask);
    }
    if (r.bar_arrived > 0) fail_divergent_barrier(r);
    hand_over();
    abort();  // a finished fiber is never resumed
}

namespace {

// Names the argument whose memory `addr` is next to, if any.
void describe_address(Run& r, uintptr_t addr, char* buf, size_t cap) {
    if (t_stacks.in_guard(addr)) {
        appendf(buf, cap, " (a fiber's stack overflowed: the kernel uses more than %zu KiB of "
                          "local memory per thread)", STACK_SIZE / 1024);
        return;
    }
    // The nearest argument within 1 MiB of the address.
    const uint64_t reach = 1u << 20;
    size_t best = r.nargs;
    uint64_t best_dist = reach;
    for (size_t i = 0; i < r.nargs; ++i) {
        const WickSimArg& a = r.args[i];
        if (a.kind != WICK_ARG_PTR_IN && a.kind != WICK_ARG_PTR_OUT) continue;
        const uint64_t d = addr >= a.hi ? addr - a.hi : addr < a.lo ? a.lo - addr : 0;
        if (d < best_dist || best == r.nargs) {
            if (d < reach) {
                best = i;
                best_dist = d;
            }
        }
    }
    if (best == r.nargs) return;
    const WickSimArg& a = r.args[best];
    if (addr >= a.hi) {
        appendf(buf, cap, " (%llu bytes past the end of argument %zu, %s, of %llu bytes)",
                (unsigned long long)(addr - a.hi), best, a.name, (unsigned long long)(a.hi - a.lo));
    } else {
        appendf(buf, cap, " (%llu bytes before the start of argument %zu, %s)",
                (unsigned long long)(a.lo - addr), best, a.name);
    }
}

struct sigaction g_old[32];
std::once_flag g_handlers_once;

void on_fault(int sig, siginfo_t* si, void* uc) {
    Run* r = t_run;
    if (r != nullptr && r->running) {
        r->running = false;
        r->msg[0] = 0;
        where(*r, r->msg, sizeof r->msg);
        const Thread& t = r->th[r->cur];
        appendf(r->msg, sizeof r->msg, " thread (%u,%u,%u): ", t.idx.x, t.idx.y, t.idx.z);
        const uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr);
        switch (sig) {
            case SIGSEGV:
            case SIGBUS:
                appendf(r->msg, sizeof r->msg, "invalid memory access at %p", si->si_addr);
                describe_address(*r, addr, r->msg, sizeof r->msg);
                break;
            case SIGILL:
                appendf(r->msg, sizeof r->msg,
                        "a UB check trapped at %p: an index out of bounds of a fixed-size array "
                        "(shared or local), a misaligned vector access, or signed overflow "
                        "(build with WICK_SIM_UBSAN=1 for the source line)",
                        si->si_addr);
                break;
            case SIGFPE:
                appendf(r->msg, sizeof r->msg, "arithmetic fault (integer division by zero?)");
                break;
            default: appendf(r->msg, sizeof r->msg, "signal %d", sig);
        }
        if (t.line > 0) {
            appendf(r->msg, sizeof r->msg, "; its last barrier/warp op was %s:%d",
                    base_name(t.file), t.line);
        }
        r->failed = true;
        siglongjmp(r->jmp, 1);
    }
    // Not a kernel's fault: whatever handled it before us (Rust's stack-overflow check, or
    // the default action once we return and the instruction faults again).
    const struct sigaction& old = g_old[sig];
    if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction != nullptr) {
        old.sa_sigaction(sig, si, uc);
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
        old.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
    }
}

void install_handlers() {
    std::call_once(g_handlers_once, [] {
        for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE}) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = on_fault;
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
            sigemptyset(&sa.sa_mask);
            sigaction(sig, &sa, &g_old[sig]);
        }
    });
}

// Runs the block t_block_idx. False on failure (message in r.msg).
bool run_block(Run& r) {
    for (int i = 0; i < r.n; ++i) {
        Thread& t = r.th[i];
        t.st = St::Ready;
        t.line = 0;
        t.file = "";
        t.op = -1;
        t.idx = {(unsigned)i % r.block.x, ((unsigned)i / r.block.x) % r.block.y,
                 (unsigned)i / (r.block.x * r.block.y)};
#if defined(__x86_64__)
        fiber_init(t.fiber, t_stacks.top(i));
#else
        fiber_init(t.fiber, t_stacks.top(i), STACK_SIZE);
#endif
    }
    for (size_t w = 0; w < r.warps.size(); ++w) {
        Warp& wp = r.warps[w];
        const int lanes = std::min(WARP, r.n - (int)w * WARP);
        wp.exists = lanes == WARP ? 0xffffffffu : ((1u << lanes) - 1);
        wp.exited = wp.mask = wp.arrived = 0;
    }
    r.ready = r.n;
    r.done = 0;
    r.bar_arrived = 0;
    r.cur = r.reverse ? r.n - 1 : 0;
    for (;;) {
        t_thread_idx = r.th[r.cur].idx;
        r.running = true;
        fiber_switch(r.main, r.th[r.cur].fiber);
        r.running = false;
        if (r.failed) return false;
        if (r.done == r.n) return true;
        if (r.ready > 0) {  // not expected: a fiber hands over to ready ones itself
            r.cur = find_ready(r, r.cur);
            continue;
        }
        r.msg[0] = 0;
        where(r, r.msg, sizeof r.msg);
        appendf(r.msg, sizeof r.msg, ": deadlock: ");
        describe_threads(r, r.msg, sizeof r.msg);
        return false;
    }
}

bool check_args(const KernelEntry& k, const WickSimArg* args, size_t nargs, char* err,
                size_t cap) {
    if (nargs != k.nparams) {
        snprintf(err, cap, "%s takes %u parameters, the launch passes %zu", k.name, k.nparams,
                 nargs);
        return false;
    }
    for (size_t i = 0; i < nargs; ++i) {
        const ParamDesc& p = k.params[i];
        const WickSimArg& a = args[i];
        const bool ptr_arg = a.kind == WICK_ARG_PTR_IN || a.kind == WICK_ARG_PTR_OUT ||
                             a.kind == WICK_ARG_PTR_NULL;
        const char* why = nullptr;
        if (a.size != p.size) {
            why = "has the wrong size";
        } else if ((p.kind == PARAM_PTR) != ptr_arg) {
            why = p.kind == PARAM_PTR ? "is a pointer, the launch passes a value"
                                      : "is a value, the launch passes a pointer";
        } else if (p.kind != PARAM_PTR && (p.kind == PARAM_FLOAT) != (a.kind == WICK_ARG_FLOAT)) {
            why = "is passed as the wrong kind (integer vs floating point)";
        } else if (p.kind == PARAM_PTR && a.kind != WICK_ARG_PTR_NULL && p.elem_size != 0 &&
                   p.elem_size != a.elem_size) {
            why = "points to elements of another size (wrong dtype?)";
        } else if (p.kind == PARAM_PTR && a.kind == WICK_ARG_PTR_OUT && p.is_const) {
            why = "is const in the kernel, but the launch says the kernel writes it";
        } else if (p.kind == PARAM_PTR && a.kind == WICK_ARG_PTR_IN && !p.is_const) {
            why = "may be written by the kernel (not const), but the launch passes it as input";
        }
        if (why) {
            snprintf(err, cap,
                     "%s: parameter %zu (%s) %s (kernel: kind %d, %u bytes, elements of %u; "
                     "launch: kind %u, %u bytes, elements of %u)",
                     k.name, i, a.name, why, p.kind, p.size, p.elem_size, a.kind, a.size,
                     a.elem_size);
            return false;
        }
    }
    return true;
}

uint64_t g_counts[256];

}  // namespace

extern "C" const char* wick_sim_kernel_name(size_t i) {
    size_t n = 0;
    const KernelEntry* ks = registry(&n);
    return i < n ? ks[i].name : nullptr;
}

extern "C" uint64_t wick_sim_launch_count(size_t i) {
    return i < 256 ? __atomic_load_n(&g_counts[i], __ATOMIC_RELAXED) : 0;
}

extern "C" int wick_sim_launch(const char* kernel, const uint32_t grid[3],
                               const uint32_t block[3], const WickSimArg* args, size_t nargs,
                               uint32_t flags, char* err, size_t err_len) {
    size_t nk = 0;
    const KernelEntry* ks = registry(&nk);
    size_t ki = 0;
    while (ki < nk && strcmp(ks[ki].name, kernel) != 0) ++ki;
    if (ki == nk) {
        snprintf(err, err_len, "no kernel named %s in kernels/ (is it in kernels/sim/kernels.cpp?)",
                 kernel);
        return 1;
    }
    const KernelEntry& k = ks[ki];
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
        grid[1] > 65535 || grid[2] > 65535 || threads == 0 || threads > 1024 ||
        block[0] > 1024 || block[1] > 1024 || block[2] > 64) {
        snprintf(err, err_len,
                 "%s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) (CUDA "
                 "limits: grid y/z <= 65535, block <= 1024 threads, z <= 64)",
                 kernel, grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    if (!check_args(k, args, nargs, err, err_len)) return 1;
    if (t_run != nullptr) {
        snprintf(err, err_len, "%s: launched from inside a kernel", kernel);
        return 1;
    }
    if (!t_stacks.reserve(threads)) {
        snprintf(err, err_len, "%s: cannot map %llu fiber stacks", kernel,
                 (unsigned long long)threads);
        return 1;
    }
    install_handlers();
    __atomic_fetch_add(&g_counts[ki < 256 ? ki : 255], 1, __ATOMIC_RELAXED);

    std::vector<const void*> values(nargs);
    for (size_t i = 0; i < nargs; ++i) values[i] = args[i].value;

    Run& r = t_run_storage;
    r.k = &k;
    r.values = values.data();
    r.args = args;
    r.nargs = nargs;
    r.grid = dim3(grid[0], grid[1], grid[2]);
    r.block = dim3(block[0], block[1], block[2]);
    r.n = (int)threads;
    r.reverse = (flags & WICK_SIM_REVERSE) != 0;
    r.th.resize(r.n);
    r.warps.resize((r.n + WARP - 1) / WARP);
    r.failed = false;
    r.running = false;
    r.msg[0] = 0;
    t_grid_dim = r.grid;
    t_block_dim = r.block;
    t_run = &r;

    volatile bool ok = true;
    if (sigsetjmp(r.jmp, 1) != 0) {
        ok = false;  // a fault inside a fiber (on_fault wrote the message)
    } else {
        // Blocks in order (x fastest), or from the last with WICK_SIM_REVERSE.
        const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
        for (uint64_t i = 0; ok && i < blocks; ++i) {
            const uint64_t b = r.reverse ? blocks - 1 - i : i;
            t_block_idx = {(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                           (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
            ok = run_block(r);
        }
    }
    t_run = nullptr;
    if (!ok) {
        snprintf(err, err_len, "%s", r.msg);
        return 1;
    }
    return 0;
}
