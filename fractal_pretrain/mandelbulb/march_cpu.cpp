// Host build of render/kernels/mandelbulb.cu's march_sprites: the kernel's own code (not a copy) compiled
// with the host C++ compiler, every CUDA thread one call, the sprite rows spread over std::threads.
//
// Byte-identical to the kernel and to mandelbulb/reference.py in the kernels' discipline: float32 +, -, *, /,
// sqrt in one order, built with -ffp-contract=off -fno-fast-math (no fused multiply-add, IEEE division and
// square root); `pick` takes its C++ form (the inline PTX is device-only). march_sprites has no
// __syncthreads and no shared memory, so a thread is a plain function call. mandelbulb/cpu.py builds this
// file (cached by content hash) and calls march.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline

namespace {

struct Dim3 {
  unsigned x, y, z;
};
thread_local Dim3 blockIdx{0, 0, 0}, threadIdx{0, 0, 0}, blockDim{1, 1, 1};

template <typename To, typename From>
inline To bit_cast(From from) {
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
inline float __int_as_float(int i) { return bit_cast<float>(i); }
inline float __uint_as_float(unsigned i) { return bit_cast<float>(i); }
inline unsigned __float_as_uint(float f) { return bit_cast<unsigned>(f); }
using std::min;

}  // namespace

#include "mandelbulb.cu"

// Sprites (n_items, max_side, max_side, 4) as march_sprites writes them; `tiles` = its warps per object
// (kernel_constants.mb_march_threads / 32). Returns 0, or 1 if a thread failed.
extern "C" __attribute__((visibility("default"))) int march(int max_side, int supersample, int flags,
                                                             const int *item_i, const float *item_f,
                                                             int n_items, int tiles, unsigned char *sprites,
                                                             int threads) {
  const int warp = MB_TILE_ROWS * MB_TILE_COLS;
  const long long units = (long long)n_items * tiles;
  std::atomic<long long> next{0};
  std::atomic<int> failed{0};
  auto work = [&] {
    try {
      blockDim = {(unsigned)warp, 1, 1};  // one block per tile: q = tile * 32 + lane
      for (long long unit; (unit = next.fetch_add(1)) < units;) {
        blockIdx = {(unsigned)(unit % tiles), (unsigned)(unit / tiles), 0};
        for (int lane = 0; lane < warp; ++lane) {
          threadIdx.x = (unsigned)lane;
          march_sprites(max_side, supersample, flags, item_i, item_f, sprites);
        }
      }
    } catch (...) {
      failed = 1;
    }
  };
  const int n = std::max(1, std::min<int>(threads, (int)std::min<long long>(units, 1 << 20)));
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto &t : pool) t.join();
  return failed.load();
}
