// Runs the project's CUDA kernel sources on the CPU, for the tests (`kernel_emulator.rs`). It covers the part of
// CUDA those sources use: grids and blocks in up to three dimensions, static and dynamic shared memory,
// __syncthreads, full-warp __shfl_xor_sync, and the float intrinsics (rounded as IEEE f32 does; nvcc's fused
// multiply-adds are not reproduced, so values match the GPU's within a rounding, not bit for bit).
//
// Each thread of a block is a coroutine (ucontext) on its own stack, run until it reaches a barrier or returns;
// a barrier lets the next thread run. That makes three kinds of kernel bug visible on a CPU:
// - a barrier some threads never reach (divergent __syncthreads, a shuffle with an exited lane) stops with an
//   error naming the threads, where a GPU would hang or compute garbage;
// - a race between two barriers gives a different result when the threads (and blocks) run in reverse order,
//   which the driver can be asked to do;
// - an access outside a buffer or the dynamic shared memory is caught by AddressSanitizer, under which the
//   harness compiles this (each buffer is its own allocation of exactly its size).
#include <ucontext.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

struct dim3 {
    unsigned int x, y, z;
};

namespace emu {

[[noreturn]] inline void fail(const std::string& why) {
    std::fprintf(stderr, "kernel emulator: %s\n", why.c_str());
    std::exit(3);
}

enum class Wait { None, Block, Warp };

struct Thread {
    ucontext_t ctx;
    char* stack = nullptr;
    dim3 idx{0, 0, 0};
    unsigned linear = 0;
    bool done = false;
    Wait wait = Wait::None;
    unsigned long seen = 0;  // the barrier's generation when this thread arrived
    void* fake_stack = nullptr;
};

constexpr size_t kStack = 256 * 1024;

inline dim3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0}, g_block_dim{1, 1, 1}, g_grid_dim{1, 1, 1};
inline std::vector<Thread> g_threads;
inline Thread* g_cur = nullptr;
inline ucontext_t g_sched;
inline const void* g_sched_bottom = nullptr;
inline size_t g_sched_size = 0;
inline unsigned long g_block_gen = 0;
inline unsigned g_block_arrived = 0;
inline std::vector<unsigned long> g_warp_gen;
inline std::vector<unsigned> g_warp_arrived;
inline std::vector<uint64_t> g_shuffle;
inline unsigned char* g_dynamic_shared = nullptr;
inline std::function<void()> g_body;

inline unsigned live_threads() {
    unsigned n = 0;
    for (const Thread& t : g_threads) n += !t.done;
    return n;
}

// Switches from the running thread back to the scheduler (`exiting`: the thread never resumes).
inline void to_scheduler(bool exiting) {
    Thread* me = g_cur;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &me->fake_stack, g_sched_bottom, g_sched_size);
#else
    (void)exiting;
#endif
    swapcontext(&me->ctx, &g_sched);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(me->fake_stack, &g_sched_bottom, &g_sched_size);
#endif
}

inline void thread_entry() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
    g_body();
    g_cur->done = true;
    to_scheduler(true);
}

// Every thread of the block must arrive: CUDA leaves a barrier that some threads skip or return before undefined
// (it may hang), so the emulator calls it an error.
inline void syncthreads() {
    Thread* me = g_cur;
    if (live_threads() != g_threads.size())
        fail("divergent __syncthreads: thread " + std::to_string(me->linear) +
             " reached a barrier after another thread of its block returned");
    if (++g_block_arrived == g_threads.size()) {
        g_block_arrived = 0;
        ++g_block_gen;
        return;
    }
    me->wait = Wait::Block;
    me->seen = g_block_gen;
    while (g_block_gen == me->seen) to_scheduler(false);
    me->wait = Wait::None;
    g_thread_idx = me->idx;
}

inline void warp_barrier() {
    Thread* me = g_cur;
    const unsigned w = me->linear / 32;
    if (++g_warp_arrived[w] == 32) {
        g_warp_arrived[w] = 0;
        ++g_warp_gen[w];
        return;
    }
    me->wait = Wait::Warp;
    me->seen = g_warp_gen[w];
    while (g_warp_gen[w] == me->seen) to_scheduler(false);
    me->wait = Wait::None;
    g_thread_idx = me->idx;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (only full warps are emulated)");
    const unsigned nthreads = g_block_dim.x * g_block_dim.y * g_block_dim.z;
    if (nthreads % 32 != 0) fail("__shfl_xor_sync in a block that is not a whole number of warps");
    if (lane_mask < 0 || lane_mask > 31) fail("__shfl_xor_sync lane mask outside 0..31");
    Thread* me = g_cur;
    const unsigned w = me->linear / 32, lane = me->linear % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_shuffle[w * 32 + lane] = bits;
    warp_barrier();
    bits = g_shuffle[w * 32 + (lane ^ (unsigned)lane_mask)];
    warp_barrier();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline std::string waits() {
    std::string s;
    for (const Thread& t : g_threads) {
        if (t.done) continue;
        char buf[96];
        std::snprintf(buf, sizeof buf, " thread %u at %s;", t.linear,
                      t.wait == Wait::Block ? "__syncthreads" : t.wait == Wait::Warp ? "a shuffle" : "no barrier");
        s += buf;
    }
    return s;
}

// Runs one block's threads to completion, favouring low (or, `reverse`, high) thread numbers.
inline void run_block(bool reverse) {
    const unsigned n = (unsigned)g_threads.size();
    g_block_arrived = 0;
    std::fill(g_warp_arrived.begin(), g_warp_arrived.end(), 0u);
    for (unsigned i = 0; i < n; ++i) {
        Thread& t = g_threads[i];
        t.done = false;
        t.wait = Wait::None;
        t.fake_stack = nullptr;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack;
        t.ctx.uc_stack.ss_size = kStack;
        t.ctx.uc_link = nullptr;
        makecontext(&t.ctx, thread_entry, 0);
    }
    // Always the first runnable thread in the order: the first warp runs ahead of the others until it waits at a
    // __syncthreads (or returns), the schedule under which a missing barrier most often shows.
    for (;;) {
        Thread* next = nullptr;
        bool all_done = true;
        for (unsigned k = 0; k < n && !next; ++k) {
            Thread& t = g_threads[reverse ? n - 1 - k : k];
            if (t.done) continue;
            all_done = false;
            if (t.wait == Wait::Block && t.seen == g_block_gen) continue;
            if (t.wait == Wait::Warp && t.seen == g_warp_gen[t.linear / 32]) continue;
            next = &t;
        }
        if (all_done) return;
        if (!next) {
            char where[80];
            std::snprintf(where, sizeof where, "deadlock in block (%u, %u, %u):", g_block_idx.x, g_block_idx.y,
                          g_block_idx.z);
            fail(std::string(where) + waits());
        }
        Thread& t = *next;
        g_cur = &t;
        g_thread_idx = t.idx;
        void* fake = nullptr;
#if EMU_ASAN
        __sanitizer_start_switch_fiber(&fake, t.stack, kStack);
#endif
        swapcontext(&g_sched, &t.ctx);
#if EMU_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        if (t.done) {
            const unsigned w = t.linear / 32;
            if (!g_warp_arrived.empty() && g_warp_arrived[w] > 0)
                fail("thread " + std::to_string(t.linear) + " returned while its warp waits in a shuffle");
            if (g_block_arrived > 0)
                fail("divergent __syncthreads: thread " + std::to_string(t.linear) + " returned while " +
                     std::to_string(g_block_arrived) + " threads of its block wait at a barrier");
        }
    }
}

// Runs `body` as the kernel over `grid` × `block` threads; `reverse` runs the blocks and each block's threads in
// decreasing order.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body, bool reverse) {
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024) fail("block of " + std::to_string(n) + " threads (1..=1024)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
    if (shared_bytes > 227 * 1024) fail("dynamic shared memory above 227 KiB");
    g_body = std::move(body);
    g_block_dim = block;
    g_grid_dim = grid;
    g_threads.assign(n, Thread{});
    for (unsigned i = 0; i < n; ++i) {
        Thread& t = g_threads[i];
        t.linear = i;
        t.idx = dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        t.stack = static_cast<char*>(std::malloc(kStack));
        if (!t.stack) fail("out of memory for thread stacks");
    }
    g_warp_gen.assign((n + 31) / 32, 0);
    g_warp_arrived.assign((n + 31) / 32, 0);
    g_shuffle.assign(((n + 31) / 32) * 32, 0);
    const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
    for (unsigned long k = 0; k < blocks; ++k) {
        const unsigned long b = reverse ? blocks - 1 - k : k;
        g_block_idx = dim3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                           (unsigned)(b / ((unsigned long)grid.x * grid.y))};
        // Fresh for every block and filled with 0xff bytes (a NaN for floats): shared memory read before it is
        // written shows up in the results. An exact-size allocation, so AddressSanitizer bounds it.
        g_dynamic_shared = static_cast<unsigned char*>(std::malloc(shared_bytes ? shared_bytes : 1));
        if (!g_dynamic_shared) fail("out of memory for shared memory");
        std::memset(g_dynamic_shared, 0xff, shared_bytes);
        run_block(reverse);
        std::free(g_dynamic_shared);
        g_dynamic_shared = nullptr;
    }
    for (Thread& t : g_threads) std::free(t.stack);
    g_threads.clear();
}

// The launch's arguments, read from the file the harness writes: one per line, `buf <path> <bytes> <writable>`,
// `null`, `i32 <v>`, `i64 <v>`, `u32 <v>`, `f32 <bits>`; a writable buffer is written back to `<path>.out`.
struct Args {
    struct Arg {
        std::string kind, path;
        long long value = 0;
        void* data = nullptr;
        size_t bytes = 0;
        bool writable = false;
    };
    dim3 grid{1, 1, 1}, block{1, 1, 1};
    size_t shared = 0;
    bool reverse = false;
    std::vector<Arg> args;

    explicit Args(const char* file) {
        FILE* f = std::fopen(file, "r");
        if (!f) fail(std::string("cannot open ") + file);
        char order[16] = {0};
        unsigned long long shared_ll = 0;
        if (std::fscanf(f, "grid %u %u %u block %u %u %u shared %llu order %15s", &grid.x, &grid.y, &grid.z,
                        &block.x, &block.y, &block.z, &shared_ll, order) != 8)
            fail("bad launch header");
        shared = (size_t)shared_ll;
        reverse = std::string(order) == "reverse";
        char kind[16];
        while (std::fscanf(f, "%15s", kind) == 1) {
            Arg a;
            a.kind = kind;
            if (a.kind == "buf") {
                char path[4096];
                int writable = 0;
                unsigned long long bytes = 0;
                if (std::fscanf(f, "%4095s %llu %d", path, &bytes, &writable) != 3) fail("bad buf line");
                a.path = path;
                a.bytes = (size_t)bytes;
                a.writable = writable != 0;
                a.data = std::malloc(a.bytes ? a.bytes : 1);
                if (!a.data) fail("out of memory for " + a.path);
                FILE* in = std::fopen(path, "rb");
                if (!in || std::fread(a.data, 1, a.bytes, in) != a.bytes) fail("cannot read " + a.path);
                std::fclose(in);
            } else if (a.kind != "null") {
                if (std::fscanf(f, "%lld", &a.value) != 1) fail("bad scalar line");
            }
            args.push_back(a);
        }
        std::fclose(f);
    }

    const Arg& at(size_t i, const char* kind) const {
        if (i >= args.size()) fail("argument " + std::to_string(i) + " missing");
        if (args[i].kind != kind && !(std::string(kind) == "buf" && args[i].kind == "null"))
            fail("argument " + std::to_string(i) + " is " + args[i].kind + ", the call wants " + kind);
        return args[i];
    }
    template <typename T>
    T* ptr(size_t i) const {
        return static_cast<T*>(at(i, "buf").data);
    }
    int i32(size_t i) const { return (int)at(i, "i32").value; }
    long i64(size_t i) const { return (long)at(i, "i64").value; }
    unsigned int u32(size_t i) const { return (unsigned int)at(i, "u32").value; }
    float f32(size_t i) const {
        const uint32_t bits = (uint32_t)at(i, "f32").value;
        float v;
        std::memcpy(&v, &bits, 4);
        return v;
    }

    void write_back() const {
        for (const Arg& a : args) {
            if (a.kind != "buf" || !a.writable) continue;
            const std::string out = a.path + ".out";
            FILE* f = std::fopen(out.c_str(), "wb");
            if (!f || std::fwrite(a.data, 1, a.bytes, f) != a.bytes) fail("cannot write " + out);
            std::fclose(f);
        }
        for (const Arg& a : args) std::free(a.data);
    }
};

}  // namespace emu

// What the kernel sources see of CUDA.
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx (emu::g_thread_idx)
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return emu::shfl_xor(mask, v, lane_mask);
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
using std::max;
using std::min;
