// CUDA kernels on the CPU: the runtime that render/emulator.py builds every kernel file against, so that
// the kernels' semantics (not their speed) are tested where there is no GPU.
//
// Each thread of a block is a fiber (ucontext) with its own stack; the blocks of a grid run one after
// another. Fibers switch only at __syncthreads and at warp collectives, so a launch is deterministic.
// The order in which a block's runnable fibers resume is a launch option (forward or reverse): a kernel
// whose output depends on it has a race. Shared memory (static and dynamic) is filled with a poison byte,
// another option, at the start of every block: output that depends on it reads shared memory it never
// wrote. Float arithmetic is IEEE float32 without contraction (-ffp-contract=off, like nvcc -fmad=false),
// so results are bit-comparable with the GPU's.
// A third option flushes float32 denormals to zero (x86 MXCSR FTZ + DAZ) for the launch, as CuPy's NVRTC builds
// do on the GPU (it appends -ftz=true to every build): a kernel whose output changes with it differs on a GPU.
// Not emulated: divergence inside a warp (__activemask() is every live lane of the warp), races between
// blocks (they run in sequence), multi-dimensional blocks (grids may be 2-D), and anything to do with time.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <functional>
#include <memory>
#include <string>
#include <vector>

struct emu_dim3 {
  unsigned x, y, z;
};

namespace emu {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
  ucontext_t ctx;
  State state;
};

struct Warp {
  unsigned live;     // lanes that have not returned
  unsigned arrived;  // lanes waiting in the current collective
  unsigned mask;     // the lanes the current collective waits for (its callers' mask)
  unsigned gen;      // collectives completed; slots alternate so a fast lane cannot overwrite a slow one's
  long long slots[2][32];
};

struct Runtime {
  emu_dim3 thread_idx{0, 1, 1}, block_idx{0, 1, 1}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  size_t stack_bytes = 128 * 1024, stacks_for = 0;
  ucontext_t scheduler;
  int current = -1, live = 0, arrived = 0, and_acc = 1, and_result = 0;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_shared;
  std::vector<std::vector<unsigned char>> static_shared;  // one arena per __shared__ declaration
  unsigned char poison = 0xCD;
  bool reverse = false;
  const std::function<void()> *body = nullptr;
  std::string error;
};

inline Runtime runtime;

inline Fiber &me() { return runtime.fibers[runtime.current]; }
inline void yield() { swapcontext(&me().ctx, &runtime.scheduler); }
inline unsigned lane() { return runtime.thread_idx.x % 32; }
inline Warp &my_warp() { return runtime.warps[runtime.thread_idx.x / 32]; }

inline void fail(const std::string &message) {
  if (runtime.error.empty()) runtime.error = message;
}

// __syncthreads: the last live thread to arrive releases the others.
inline void release_block_barrier() {
  runtime.and_result = runtime.and_acc;
  runtime.and_acc = 1;
  runtime.arrived = 0;
  for (auto &f : runtime.fibers)
    if (f.state == AT_BARRIER) f.state = RUNNABLE;
}

inline int block_barrier(int predicate) {
  runtime.and_acc &= predicate ? 1 : 0;
  if (++runtime.arrived == runtime.live) {
    release_block_barrier();
  } else {
    me().state = AT_BARRIER;
    yield();
  }
  return runtime.and_result;
}

inline void release_warp(Warp &w, unsigned warp_index) {
  w.arrived = 0;
  w.gen += 1;
  for (unsigned i = 0; i < 32; ++i) {
    unsigned t = warp_index * 32 + i;
    if (t < runtime.fibers.size() && runtime.fibers[t].state == AT_WARP) runtime.fibers[t].state = RUNNABLE;
  }
}

// A warp collective: every lane of `mask` posts a value; returns the generation whose slots hold them.
inline unsigned warp_exchange(unsigned mask, long long value) {
  Warp &w = my_warp();
  const unsigned me_bit = 1u << lane();
  if (!(mask & me_bit)) fail("a warp collective called by a lane outside its mask");
  const unsigned gen = w.gen;
  w.slots[gen & 1][lane()] = value;
  w.arrived |= me_bit;
  w.mask = mask;
  if ((w.arrived & mask & w.live) == (mask & w.live)) {
    release_warp(w, runtime.thread_idx.x / 32);
  } else {
    me().state = AT_WARP;
    yield();
  }
  return gen;
}

// Posts `value` in a collective of `mask`; returns every lane's posted value (valid for the lanes of mask).
inline const long long *posted(unsigned mask, long long value) {
  const unsigned gen = warp_exchange(mask, value);
  return my_warp().slots[gen & 1];
}

// The lanes of `mask` whose posted value satisfies `test`, as a bit mask.
template <typename Test>
unsigned lanes_where(unsigned mask, const long long *slots, Test test) {
  unsigned bits = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && test(slots[i])) bits |= 1u << i;
  return bits;
}

inline void fiber_main() {
  (*runtime.body)();
  Fiber &f = me();
  f.state = DONE;
  runtime.live -= 1;
  Warp &w = my_warp();
  w.live &= ~(1u << lane());
  // A returned thread no longer holds up a barrier or a collective of its warp.
  if (runtime.arrived > 0 && runtime.arrived == runtime.live) release_block_barrier();
  if (w.arrived && (w.arrived & w.mask & w.live) == (w.mask & w.live)) release_warp(w, runtime.thread_idx.x / 32);
}  // returns to the scheduler through uc_link

inline void run_block(unsigned bx, unsigned by) {
  Runtime &r = runtime;
  const unsigned n = r.block_dim.x;
  r.block_idx = {bx, by, 0};
  r.live = (int)n;
  r.arrived = 0;
  r.and_acc = 1;
  r.warps.assign((n + 31) / 32, Warp{});
  for (unsigned i = 0; i < n; ++i) r.warps[i / 32].live |= 1u << (i % 32);
  memset(r.dynamic_shared.data(), r.poison, r.dynamic_shared.size());
  for (auto &arena : r.static_shared) memset(arena.data(), r.poison, arena.size());
  for (unsigned i = 0; i < n; ++i) {
    Fiber &f = r.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks.get() + i * r.stack_bytes;
    f.ctx.uc_stack.ss_size = r.stack_bytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = RUNNABLE;
  }
  while (r.live > 0 && r.error.empty()) {
    bool ran = false;
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = r.reverse ? n - 1 - k : k;
      if (r.fibers[i].state != RUNNABLE) continue;
      ran = true;
      r.current = (int)i;
      r.thread_idx = {i, 0, 0};
      swapcontext(&r.scheduler, &r.fibers[i].ctx);
    }
    if (!ran && r.live > 0) {
      fail("deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) + "): " + std::to_string(r.live) +
           " threads wait at a barrier or warp collective that not all of them reach");
    }
  }
}

// Runs `body` as a kernel of (grid_x, grid_y) blocks of `block` threads; returns "" or the error.
inline std::string launch(unsigned grid_x, unsigned grid_y, unsigned block, size_t shared_bytes,
                          unsigned char poison, bool reverse, bool ftz, const std::function<void()> &body) {
  Runtime &r = runtime;
  r.error.clear();
  if (block == 0 || block > 1024) return "block size " + std::to_string(block) + " is not in 1..1024";
#if defined(__SSE__)
  const unsigned csr = _mm_getcsr();  // every fiber's context is taken in run_block, so it inherits this
  if (ftz) _mm_setcsr(csr | 0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
#else
  if (ftz) return "ftz: flushing denormals is only emulated on x86 (MXCSR)";
#endif
  if (r.stacks_for < block) {
    r.stacks.reset(new char[block * r.stack_bytes]);
    r.stacks_for = block;
  }
  r.fibers.assign(block, Fiber{});
  r.grid_dim = {grid_x, grid_y, 1};
  r.block_dim = {block, 1, 1};
  r.dynamic_shared.assign(shared_bytes, poison);
  r.poison = poison;
  r.reverse = reverse;
  r.body = &body;
  for (unsigned y = 0; y < grid_y && r.error.empty(); ++y)
    for (unsigned x = 0; x < grid_x && r.error.empty(); ++x) run_block(x, y);
#if defined(__SSE__)
  _mm_setcsr(csr);
#endif
  return r.error;
}

inline void *dynamic_shared() { return runtime.dynamic_shared.data(); }

// Storage of the id-th static __shared__ declaration (emulator.py numbers them), poisoned per block.
template <typename T>
T *static_shared(unsigned id) {
  auto &arenas = runtime.static_shared;
  if (arenas.size() <= id) arenas.resize(id + 1);
  if (arenas[id].size() < sizeof(T)) arenas[id].assign(sizeof(T), runtime.poison);
  return reinterpret_cast<T *>(arenas[id].data());
}

}  // namespace emu

// ---- the CUDA names the kernels use ----
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define threadIdx (emu::runtime.thread_idx)
#define blockIdx (emu::runtime.block_idx)
#define blockDim (emu::runtime.block_dim)
#define gridDim (emu::runtime.grid_dim)
#define warpSize 32

inline void __syncthreads() { emu::block_barrier(1); }
inline int __syncthreads_and(int p) { return emu::block_barrier(p); }
inline void __threadfence() {}
inline void __threadfence_block() {}

inline unsigned __activemask() { return emu::my_warp().live; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_exchange(mask & emu::my_warp().live, 0); }

inline unsigned __match_any_sync(unsigned mask, long long key) {
  return emu::lanes_where(mask, emu::posted(mask, key), [&](long long v) { return v == key; });
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return emu::lanes_where(mask, emu::posted(mask, p != 0), [](long long v) { return v != 0; });
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return __ballot_sync(mask, p) == mask; }

inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  const long long *slots = emu::posted(mask, v);
  unsigned best = 0;
  for (unsigned i = 0; i < 32; ++i)
    if ((mask >> i) & 1u) best = (unsigned)slots[i] > best ? (unsigned)slots[i] : best;
  return best;
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  static_assert(sizeof(T) <= sizeof(long long), "__shfl_sync of a wide type");
  long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  const long long *slots = emu::posted(mask, bits);
  const unsigned base = emu::lane() / width * width;
  T out;
  memcpy(&out, &slots[base + ((unsigned)src % width)], sizeof(T));
  return out;
}

// Atomics: fibers never switch inside one, so a plain read-modify-write is atomic.
template <typename T, typename Op>
T emu_rmw(T *p, Op op) {
  T old = *p;
  *p = op(old);
  return old;
}
template <typename T> T atomicAdd(T *p, T v) { return emu_rmw(p, [&](T o) { return o + v; }); }
template <typename T> T atomicOr(T *p, T v) { return emu_rmw(p, [&](T o) { return o | v; }); }
template <typename T> T atomicAnd(T *p, T v) { return emu_rmw(p, [&](T o) { return o & v; }); }
template <typename T> T atomicMax(T *p, T v) { return emu_rmw(p, [&](T o) { return o > v ? o : v; }); }
template <typename T> T atomicMin(T *p, T v) { return emu_rmw(p, [&](T o) { return o < v ? o : v; }); }
template <typename T> T atomicExch(T *p, T v) { return emu_rmw(p, [&](T) { return v; }); }
template <typename T> T atomicCAS(T *p, T compare, T v) {
  return emu_rmw(p, [&](T o) { return o == compare ? v : o; });
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
template <typename T>
T __ldg(const T *p) {
  return *p;
}
template <typename To, typename From>
inline To bits_as(From from) {  // the same bits as another 4-byte type
  static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}
inline float __int_as_float(int i) { return bits_as<float>(i); }
inline int __float_as_int(float f) { return bits_as<int>(f); }
inline float __uint_as_float(unsigned i) { return bits_as<float>(i); }
inline unsigned __float_as_uint(float f) { return bits_as<unsigned>(f); }

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900  // the H100's feature set
#define FRACTAL_EMULATOR 1  // kernels with inline PTX take their C++ form under this
