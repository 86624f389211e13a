// A small CUDA execution emulator for the generated kernels, on the CPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; a
// scheduler runs them one at a time until each reaches a barrier, a warp
// operation or its end. Semantics are strict where the hardware's are
// undefined: a __syncthreads that not every live thread reaches, a warp
// operation whose mask names an exited or absent lane, or lanes of one warp
// disagreeing on the mask is an error, as is any deadlock. Threads between
// two synchronisation points run in a chosen schedule (see ORDER_* below:
// lockstep forward or reverse, one warp running ahead through its warp
// barriers, or seeded random), so a shared-memory race or a warp barrier
// standing in for a block barrier shows up as results that depend on it.
// Global memory goes through the gs_* primitives, which check every access
// against the launch's registered buffers and the vector alignment, and
// stores against what other blocks of the launch wrote (blocks are
// unordered: two writing one element, atomics aside, is an error).
// Dynamic shared memory is NaN-filled before each block and guarded on both
// sides. Thread block clusters (a launch's `cluster` > 1): the blocks of one
// cluster run together as one set of fibers, each with its own shared memory;
// a cluster barrier waits for every thread of every block of the cluster,
// and a store into another block's shared memory (DSMEM, gs_st_peer) is an
// error before the storing thread has passed a cluster barrier (the peer may
// not have started) or once the peer has exited. Tests only; never part of
// gspngen.
#pragma once
#define GSPN_EMULATE 1

#include <ucontext.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>
#include <unordered_set>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define GS_DEV inline
#define GS_CX constexpr

namespace emu {

struct dim3v {
    unsigned x, y, z;
};

enum State { RUN = 0, BAR = 1, WARP = 2, DONE = 3, CBAR = 4 };  // CBAR: at a cluster barrier
enum WarpOp { OP_SYNC = 0, OP_XOR = 1 };

// One cp.async copy: n bytes from src into dst (zeros when !valid), landing at its group's wait.
struct Copy {
    char* dst;
    const char* src;
    int n;
    bool valid;
    unsigned char seen[16];  // the source at issue: a copy in flight reads it then or at landing, either
};

struct Fiber {
    ucontext_t ctx;
    int tid = 0;
    int blk = 0;             // the block's rank in its cluster (0 without clusters)
    bool cl_synced = false;  // has passed a cluster barrier (DSMEM stores allowed)
    State state = RUN;
    unsigned mask = 0;
    WarpOp op = OP_SYNC;
    int arg = 0;
    uint32_t val = 0, res = 0;
    std::vector<Copy> open;                // cp.async copies not yet committed to a group
    std::deque<std::vector<Copy>> groups;  // committed groups in flight, oldest first
};

// Which block wrote each 2-byte unit of a buffer in the current launch: blocks of one launch are
// unordered, so two blocks storing to one element, or one storing where others add atomically, is a
// race. (Reads are not tracked: a vector load may span steps of a neighbouring block, as the steps
// mapping's acc reads of y and gx do; the values read there are never used.)
enum : int { NONE = -1, ATOMIC = -2 };

struct Range {
    uintptr_t lo, hi;
    std::vector<int> wr;  // per 2-byte unit: the block that stored it, ATOMIC, or NONE
};

struct Ctx {
    unsigned grid = 1, block = 1, bid = 0;  // bid: the first block of the running cluster
    unsigned cluster = 1;                   // blocks per cluster
    std::vector<Fiber> fibers;
    std::vector<char> stacks;
    Fiber* cur = nullptr;
    ucontext_t sched;
    std::vector<std::vector<float>> smem;  // per block of the cluster: guard | usable | guard
    std::vector<std::vector<uint8_t>> pending;  // per block: bytes of shared memory a cp.async still writes
    std::vector<std::vector<int>> copier;       // per block: the thread whose cp.async last wrote each byte
    size_t smem_bytes = 0;
    std::vector<Range> ranges;
    std::string err;
    std::function<void()> body;
    bool ftz = false;  // fp32 subnormals flushed to zero, in and out, as the GPU build (-ftz=true)
    long long checks = 0;
    long long bytes[3] = {0, 0, 0};  // global bytes loaded, stored, atomically added (checked accesses)
    // The same, counting each byte once per launch (what DRAM sees when repeats hit in cache, e.g.
    // a scalar every thread loads); tracked only while `distinct` is on (tests of the byte model).
    bool distinct = false;
    long long dbytes[3] = {0, 0, 0};
    std::unordered_set<uintptr_t> seen[3];
};

inline Ctx g;
constexpr size_t STACK = 256 * 1024;
constexpr size_t GUARD = 64;  // floats on each side of shared memory

inline unsigned cur_bid() { return g.bid + (g.cur ? (unsigned)g.cur->blk : 0u); }
inline float* smem_of(int blk) { return g.smem[blk].data() + GUARD; }

inline void fail(const std::string& msg)
{
    if (g.err.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, " [block %u thread %d]", cur_bid(), g.cur ? g.cur->tid : -1);
        g.err = msg + where;
    }
}

inline dim3v tidx() { return dim3v{(unsigned)g.cur->tid, 0u, 0u}; }
inline dim3v bidx() { return dim3v{cur_bid(), 0u, 0u}; }
inline dim3v bdim() { return dim3v{g.block, 1u, 1u}; }
inline dim3v gdim() { return dim3v{g.grid, 1u, 1u}; }

inline void yield() { swapcontext(&g.cur->ctx, &g.sched); }

inline void syncthreads()
{
    g.cur->state = BAR;
    yield();
}

inline void sync_cluster()
{
    g.cur->state = CBAR;
    yield();
    g.cur->cl_synced = true;
}

inline uint32_t warp_op(WarpOp op, unsigned mask, int arg, uint32_t val)
{
    Fiber* f = g.cur;
    f->state = WARP;
    f->op = op;
    f->mask = mask;
    f->arg = arg;
    f->val = val;
    yield();
    return f->res;
}

// Record a block's store (kind 1) or atomic add (kind 2) to [a, a + n) of r; false on a race with
// another block of the launch.
inline bool across_blocks(Range& r, uintptr_t a, size_t n, int kind)
{
    if (kind == 0) return true;
    const int b = (int)cur_bid();
    for (size_t u = (a - r.lo) / 2, e = (a + n - r.lo + 1) / 2; u < e; ++u) {
        int& w = r.wr[u];
        const char* race = nullptr;
        if (kind == 1) {
            if (w == ATOMIC) race = "stores where blocks add atomically";
            else if (w != NONE && w != b) race = "stores where another block stored";
            w = b;
        } else {
            if (w >= 0 && w != b) race = "adds atomically where another block stored";
            if (w == NONE) w = ATOMIC;
        }
        if (race) {
            char buf[160];
            std::snprintf(buf, sizeof buf, "cross-block race: a block %s in the same launch, at %#lx", race,
                          (unsigned long)(r.lo + 2 * u));
            fail(buf);
            return false;
        }
    }
    return true;
}

// Global-memory check: [p, p + n) inside one registered buffer, p aligned.
inline bool check(const void* p, size_t n, size_t align, const char* what, bool nc = false)
{
    ++g.checks;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (align > 1 && a % align != 0) {
        char buf[128];
        std::snprintf(buf, sizeof buf, "misaligned %s of %zu bytes at %#lx", what, n, (unsigned long)a);
        fail(buf);
        return false;
    }
    // A generic pointer into this block's dynamic shared memory (the on-chip forward keeps y there): valid,
    // not global traffic, not shared between blocks (its guards and NaN fill still catch misuse).
    // A read-only (__ldg, "nc") load or an atomic there would be an illegal global access on the GPU.
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(smem_of(g.cur ? g.cur->blk : 0));
    if (a >= s0 && a + n <= s0 + g.smem_bytes) {
        if (!nc && what[0] != 'a') return true;
        fail(nc ? "read-only (__ldg) load of shared memory through a generic pointer"
                : "atomic add on shared memory through a global-memory primitive");
        return false;
    }
    for (Range& r : g.ranges)
        if (a >= r.lo && a + n <= r.hi) {
            const int kind = what[0] == 'l' ? 0 : what[0] == 's' ? 1 : 2;
            g.bytes[kind] += (long long)n;
            if (g.distinct)  // by 2-byte unit: a vector load and scalar loads of the same bytes count once
                for (size_t o = 0; o < n; o += 2)
                    if (g.seen[kind].insert(a + o).second) g.dbytes[kind] += (long long)(n - o < 2 ? n - o : 2);
            return across_blocks(r, a, n, kind);
        }
    char buf[128];
    std::snprintf(buf, sizeof buf, "out-of-bounds %s of %zu bytes at %#lx", what, n, (unsigned long)a);
    fail(buf);
    return false;
}

// cp.async (sm_80+): a thread's asynchronous global -> shared copies land only when it waits for their
// group (cp.async.wait_group), oldest group first. Until then the destination holds NaN bits and is
// pending: a checked shared read of it (gs_lds_run), or another copy into it, is an error, and so is a
// thread that exits with copies it never waited for. The source is checked at issue and must not change
// before the copy lands (the GPU may read it at any time in between); a checked read of bytes another
// thread's copy wrote is an error too (the ring's slots are private: no barrier orders them).
inline std::vector<uint8_t>& pending_of(int blk) { return g.pending[blk]; }

inline void cp_async(void* d, const void* p, int n, bool valid)
{
    Fiber* f = g.cur;
    char* base = reinterpret_cast<char*>(smem_of(f->blk));
    char* dst = static_cast<char*>(d);
    if (dst < base || dst + n > base + g.smem_bytes) { fail("cp.async destination outside the block's dynamic shared memory"); return; }
    if ((dst - base) % n != 0 || (valid && reinterpret_cast<uintptr_t>(p) % n != 0)) { fail("misaligned cp.async"); return; }
    if (n > 16) { fail("cp.async of more than 16 bytes"); return; }
    if (valid && !check(p, n, n, "load", true)) return;
    std::vector<uint8_t>& pend = pending_of(f->blk);
    for (int i = 0; i < n; ++i) {
        if (pend[dst - base + i]) { fail("cp.async into shared memory an earlier cp.async still writes"); return; }
        pend[dst - base + i] = 1;
        g.copier[f->blk][dst - base + i] = f->tid;
    }
    std::memset(dst, 0xff, n);  // NaN until it lands
    Copy c{dst, static_cast<const char*>(p), n, valid, {}};
    if (valid) std::memcpy(c.seen, p, n);
    f->open.push_back(c);
}

inline void cp_commit()
{
    Fiber* f = g.cur;
    f->groups.push_back(std::move(f->open));
    f->open.clear();
}

inline void cp_land(Fiber* f, const Copy& c)
{
    char* base = reinterpret_cast<char*>(smem_of(f->blk));
    if (!c.valid) std::memset(c.dst, 0, c.n);
    else if (std::memcmp(c.seen, c.src, c.n) != 0) fail("the source of a cp.async changed while it was in flight");
    else std::memcpy(c.dst, c.src, c.n);
    std::memset(pending_of(f->blk).data() + (c.dst - base), 0, c.n);
}

inline void cp_wait(int n)
{
    Fiber* f = g.cur;
    while ((int)f->groups.size() > n) {
        for (const Copy& c : f->groups.front()) cp_land(f, c);
        f->groups.pop_front();
    }
}

// A checked read of n bytes of this block's shared memory at s (the cp.async ring's reads).
inline bool lds_check(const void* s, size_t n)
{
    const char* base = reinterpret_cast<const char*>(smem_of(g.cur->blk));
    const char* a = static_cast<const char*>(s);
    if (a < base || a + n > base + g.smem_bytes || (a - base) % n != 0) { fail("shared read outside the block's dynamic shared memory, or misaligned"); return false; }
    for (size_t i = 0; i < n; ++i) {
        if (pending_of(g.cur->blk)[a - base + i]) { fail("shared-memory read of a cp.async destination before its cp.async.wait_group"); return false; }
        const int by = g.copier[g.cur->blk][a - base + i];
        if (by >= 0 && by != g.cur->tid) { fail("shared-memory read of another thread's cp.async destination"); return false; }
    }
    return true;
}

// __trap(): the launch fails; this thread never resumes.
[[noreturn]] inline void trap()
{
    fail("__trap() (the kernel refused the launch)");
    g.cur->state = DONE;
    swapcontext(&g.cur->ctx, &g.sched);
    std::abort();  // never resumed
}

inline void trampoline()
{
    g.body();
    bool left = !g.cur->open.empty();
    for (const auto& grp : g.cur->groups) left |= !grp.empty();
    if (left) fail("a thread exited with cp.async copies it never waited for");
    g.cur->state = DONE;
    swapcontext(&g.cur->ctx, &g.sched);
}

// Warps are per block: warp w of the cluster's fibers is warp w % per of block w / per, its first fiber
// w0 and its wn lanes (a block of fewer than 32 threads is one partial warp, never merged with the next block).
inline int warps_per_block() { return ((int)g.block + 31) / 32; }
inline int warp_count() { return (int)g.fibers.size() / (int)g.block * warps_per_block(); }
inline void warp_range(int w, int& w0, int& wn)
{
    const int per = warps_per_block(), j = w % per;
    w0 = (w / per) * (int)g.block + 32 * j;
    wn = std::min(32, (int)g.block - 32 * j);
}

// Resolve the warp operation of warp w if all its participants have arrived.
inline bool resolve_warp(int w)
{
    int w0, wn;
    warp_range(w, w0, wn);
    int first = -1;
    for (int l = 0; l < wn; ++l)
        if (g.fibers[w0 + l].state == WARP) { first = l; break; }
    if (first < 0) return false;
    const unsigned mask = g.fibers[w0 + first].mask;
    const WarpOp op = g.fibers[w0 + first].op;
    for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        if (l >= wn) { fail("warp operation names a lane that does not exist"); return false; }
        const Fiber& f = g.fibers[w0 + l];
        if (f.state == DONE) { fail("warp operation names an exited lane"); return false; }
        if (f.state != WARP) return false;
        if (f.mask != mask || f.op != op) { fail("lanes of a warp disagree on a warp operation"); return false; }
    }
    for (int l = 0; l < wn; ++l) {
        Fiber& f = g.fibers[w0 + l];
        if (f.state != WARP) continue;
        if (!((mask >> l) & 1u)) { fail("a lane outside the mask joined a warp operation"); return false; }
        if (op == OP_XOR) {
            const int src = l ^ f.arg;
            if (src >= 32 || !((mask >> src) & 1u)) { fail("shuffle source lane outside the mask"); return false; }
            f.res = g.fibers[w0 + src].val;
        }
    }
    for (int l = 0; l < wn; ++l)
        if (g.fibers[w0 + l].state == WARP) g.fibers[w0 + l].state = RUN;
    return true;
}

inline bool resolve_warps()
{
    bool progress = false;
    for (int w = 0; w < warp_count() && g.err.empty(); ++w) progress |= resolve_warp(w);
    return progress;
}

// Schedules (the `order` of a launch). Only barriers and warp operations order threads on a GPU, so
// every schedule must give bit-identical results (atomics aside):
//  ORDER_RR / ORDER_RR_REV: every runnable thread advances to its next yield, first to last (last to
//    first), then warp operations resolve: all warps move together, as lockstep as it gets.
//  ORDER_AHEAD / ORDER_AHEAD_LAST: the lowest (highest) warp with a runnable thread runs until it
//    waits at a block barrier or ends, passing its __syncwarp's alone: a __syncwarp that should have
//    been a block barrier lets it read what the other warps have not yet written. Barriers open as
//    soon as their last thread arrives, so the first (last) block of a cluster runs ahead of the others
//    up to each cluster barrier.
//  >= ORDER_RANDOM: a random runnable warp advances (its threads in a random order), seeded by the
//    order and the block, so warps drift apart by random amounts; blocks run in a random order.
enum { ORDER_RR = 0, ORDER_RR_REV = 1, ORDER_AHEAD = 2, ORDER_AHEAD_LAST = 3, ORDER_RANDOM = 16 };

struct Rng {
    uint64_t s;
    uint32_t next()
    {
        s += 0x9e3779b97f4a7c15ull;  // splitmix64
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return (uint32_t)((z ^ (z >> 31)) >> 32);
    }
};

inline void run_fiber(int i)
{
    g.cur = &g.fibers[i];
    swapcontext(&g.sched, &g.cur->ctx);
    g.cur = nullptr;
}

// Pick the warp the schedule runs next (-1: no thread is runnable).
inline int pick_warp(int order, Rng& rng)
{
    const int nw = warp_count();
    std::vector<int> cand;
    for (int w = 0; w < nw; ++w) {
        const int ww = order == ORDER_AHEAD_LAST ? nw - 1 - w : w;
        int w0, wn;
        warp_range(ww, w0, wn);
        bool runnable = false;
        for (int l = w0; l < w0 + wn && !runnable; ++l) runnable = g.fibers[l].state == RUN;
        if (!runnable) continue;
        if (order < ORDER_RANDOM) return ww;
        cand.push_back(ww);
    }
    return cand.empty() ? -1 : cand[rng.next() % cand.size()];
}

// Release what the barriers allow: a block whose live threads all wait at __syncthreads, a cluster whose
// live threads all wait at the cluster barrier. True if anything was released; errors as fail().
inline bool release_barriers()
{
    const int nb = (int)g.cluster, bs = (int)g.block, nt = nb * bs;
    bool released = false;
    for (int b = 0; b < nb; ++b) {
        int done = 0, bar = 0;
        for (int i = b * bs; i < (b + 1) * bs; ++i) {
            done += g.fibers[i].state == DONE;
            bar += g.fibers[i].state == BAR;
        }
        if (bar > 0 && bar + done == bs) {
            if (done > 0) { fail("__syncthreads not reached by threads that exited"); return false; }
            for (int i = b * bs; i < (b + 1) * bs; ++i) g.fibers[i].state = RUN;
            released = true;
        }
    }
    int done = 0, cbar = 0;
    for (const Fiber& f : g.fibers) {
        done += f.state == DONE;
        cbar += f.state == CBAR;
    }
    if (cbar > 0 && cbar + done == nt) {
        if (done > 0) { fail("cluster barrier not reached by threads that exited"); return false; }
        for (Fiber& f : g.fibers) f.state = RUN;
        released = true;
    }
    return released;
}

// Run the g.cluster blocks starting at g.bid together (one block without clusters).
inline void run_cluster(int order)
{
    const int nb = (int)g.cluster, nt = nb * (int)g.block;
    g.fibers.assign(nt, Fiber{});
    if (g.stacks.size() < STACK * nt) g.stacks.resize(STACK * nt);
    const size_t nsm = g.smem_bytes / 4 + 2 * GUARD;
    g.smem.assign(nb, std::vector<float>(nsm, std::nanf("")));
    g.pending.assign(nb, std::vector<uint8_t>(g.smem_bytes, 0));
    g.copier.assign(nb, std::vector<int>(g.smem_bytes, -1));
    for (int i = 0; i < nt; ++i) {
        Fiber& f = g.fibers[i];
        f.tid = i % (int)g.block;
        f.blk = i / (int)g.block;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = g.stacks.data() + STACK * i;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
    }
    Rng rng{(uint64_t)order * 0x100000001b3ull + g.bid};
    const bool rev = order == ORDER_RR_REV || order == ORDER_AHEAD_LAST;
    while (g.err.empty()) {
        bool ran = false;
        if (order <= ORDER_RR_REV) {
            for (int k = 0; k < nt; ++k) {
                const int i = rev ? nt - 1 - k : k;
                if (g.fibers[i].state != RUN) continue;
                run_fiber(i);
                ran = true;
            }
            if (!g.err.empty()) break;
            if (resolve_warps()) continue;
        } else {
            const int w = pick_warp(order, rng);
            if (w >= 0) {
                int w0, wn, lanes[32];
                warp_range(w, w0, wn);
                for (int l = 0; l < wn; ++l) lanes[l] = rev ? wn - 1 - l : l;
                if (order >= ORDER_RANDOM)
                    for (int l = wn - 1; l > 0; --l) std::swap(lanes[l], lanes[rng.next() % (l + 1)]);
                for (int l = 0; l < wn && g.err.empty(); ++l)
                    if (g.fibers[w0 + lanes[l]].state == RUN) run_fiber(w0 + lanes[l]);
                if (!g.err.empty()) break;
                resolve_warp(w);
                // A barrier opens as soon as its last thread arrives, as on a GPU: a block of a cluster
                // then runs ahead of the others through its own __syncthreads (only a cluster barrier
                // holds it back), where lockstep would hide a block barrier standing in for a cluster one.
                release_barriers();
                continue;
            }
        }
        if (!g.err.empty()) break;
        int done = 0;
        for (const Fiber& f : g.fibers) done += f.state == DONE;
        if (done == nt) break;
        const bool released = release_barriers();
        if (!g.err.empty()) break;
        if (released) continue;
        if (!ran) { fail("deadlock: threads wait at different barriers"); break; }
    }
    for (int b = 0; b < nb; ++b)
        for (size_t i = 0; i < GUARD; ++i)
            if (!std::isnan(g.smem[b][i]) || !std::isnan(g.smem[b][nsm - 1 - i])) {
                fail("shared memory written out of bounds");
                b = nb;
                break;
            }
}

// DSMEM: store v at the offset of p (in this block's dynamic shared memory) in block `rank` of the cluster.
inline void st_peer(float* p, int rank, float v)
{
    const int nb = (int)g.cluster;
    if (rank < 0 || rank >= nb) { fail("DSMEM store to a block rank outside the cluster"); return; }
    if (!g.cur->cl_synced) { fail("DSMEM store before a cluster barrier (the peer block may not have started)"); return; }
    float* base = smem_of(g.cur->blk);
    const size_t n = g.smem_bytes / 4;
    if (p < base || p >= base + n) { fail("DSMEM store outside the block's dynamic shared memory"); return; }
    bool live = false;
    for (int i = rank * (int)g.block; i < (rank + 1) * (int)g.block; ++i) live |= g.fibers[i].state != DONE;
    if (!live) { fail("DSMEM store to a block of the cluster that has exited"); return; }
    smem_of(rank)[p - base] = v;
}

inline int launch(unsigned grid, unsigned block, unsigned smem, int order, std::function<void()> body,
                  unsigned cluster = 1)
{
    g.err.clear();
    g.grid = grid;
    g.block = block;
    g.smem_bytes = smem;
    g.body = std::move(body);
    g.cluster = cluster;
    g.cur = nullptr;
    if (cluster < 1 || grid % cluster != 0 || (cluster > 1 && block % 32 != 0 && 32 % block != 0)) {
        fail("cluster launch: the grid must be a multiple of the cluster size, blocks whole warps or one "
             "partial warp");
        return 1;
    }
#if defined(__x86_64__) || defined(__i386__)
    // FTZ | DAZ for the launch (the fibers' contexts, made below, carry it; swapcontext saves MXCSR)
    const unsigned csr = _mm_getcsr();
    if (g.ftz) _mm_setcsr(csr | 0x8040u);
#else
    if (g.ftz) { fail("flush-to-zero is emulated on x86 only"); return 1; }
#endif
    const unsigned nc = grid / cluster;  // clusters (blocks, without clusters) run in the schedule's order
    std::vector<unsigned> blocks(nc);
    const bool rev = order == ORDER_RR_REV || order == ORDER_AHEAD_LAST;
    for (unsigned b = 0; b < nc; ++b) blocks[b] = rev ? nc - 1 - b : b;
    if (order >= ORDER_RANDOM) {
        Rng rng{(uint64_t)order};
        for (unsigned b = nc; b > 1; --b) std::swap(blocks[b - 1], blocks[rng.next() % b]);
    }
    for (unsigned b = 0; b < nc && g.err.empty(); ++b) {
        g.bid = blocks[b] * cluster;
        run_cluster(order);
    }
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(csr);
#endif
    return g.err.empty() ? 0 : 1;
}

}  // namespace emu

#define threadIdx (emu::tidx())
#define blockIdx (emu::bidx())
#define blockDim (emu::bdim())
#define gridDim (emu::gdim())

inline float __uint_as_float(unsigned u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f)
{
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
// div.approx as the GPU computes it: a times the (approximate) reciprocal of b, two roundings
// (the host's reciprocal is correctly rounded; the GPU's is within 1 ulp)
inline float __fdividef(float a, float b) { return a * (1.0f / b); }

extern "C" {
void emu_set_ranges(int n, const unsigned long long* lo, const unsigned long long* hi)
{
    emu::g.ranges.clear();
    for (int i = 0; i < n; ++i) {
        const size_t units = (size_t)(hi[i] - lo[i] + 1) / 2;
        emu::g.ranges.push_back({(uintptr_t)lo[i], (uintptr_t)hi[i], std::vector<int>(units, emu::NONE)});
    }
}
const char* emu_error() { return emu::g.err.c_str(); }
void emu_set_ftz(int on) { emu::g.ftz = on != 0; }
long long emu_checks() { return emu::g.checks; }
long long emu_bytes(int kind) { return kind < 3 ? emu::g.bytes[kind] : emu::g.dbytes[kind - 3]; }
void emu_reset_bytes(int distinct)
{
    for (int k = 0; k < 3; ++k) {
        emu::g.bytes[k] = emu::g.dbytes[k] = 0;
        emu::g.seen[k].clear();
    }
    emu::g.distinct = distinct != 0;
}
}
