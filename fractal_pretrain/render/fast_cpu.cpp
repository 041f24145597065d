// Fast CPU renderer: the NumPy reference (reference.py) as plain C++, one sample per thread.
//
// Byte-identical to the reference by construction, in the kernels' discipline: float32 operations in the
// reference's order, built with -ffp-contract=off -fno-fast-math (no fused multiply-add, IEEE division),
// integer histograms (order-independent). Shared with the CUDA kernels through common.cuh: Philox, the
// uniform draws, the plan layouts (SAMPLE_FLOATS, ITEM_INTS, ITEM_FLOATS, RI_*) and hsv_to_rgb.
// fast_cpu.py builds this file with the host compiler (cached by content hash) and calls render_batch.
//
// Per sample (reference.render_items + compose): plasma or black canvas; per active item the chaos game
// (each chain from the fixed point of map 0, points stored), bounding box, window, histogram, 3x3 patch
// stamp, density, flips and colour (a 256-entry table per item: the hue byte is the only varying input),
// written into the canvas (single object) or an object buffer pasted bilinearly (multi-object); then blur.
// Two-view recipes (views > 0, params.plan_views; chaos.cu's `views`): one chaos game and density per sample,
// coloured once per view with the view's flips and colours, pasted onto the view's own plasma canvas (keyed by
// the view key), blurred with the view's own blur.
// Speed (benchmarks/RESULTS.md): chains run 8 at a time in lockstep with their Philox blocks computed in
// AVX2 registers, the stamp is nine shifted row passes, plasma colours are memoised per (h8, s8, v8).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#define __host__
#define __device__
#include "kernels/common.cuh"

// Hot loops are also built for AVX2 and picked at load time (the same IEEE float32 operations: contraction
// stays off, so AVX2's fused multiply-add is never used).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define TARGETS
#endif
#define STAGE __attribute__((noinline))  // one symbol per stage: perf attributes the time

namespace {

struct Batch {
  int count;
  const long long *indices;
  u32 seed, epoch;
  const int *ri;
  const float *sample_f;
  const int *item_i;
  const float *item_f;
  unsigned char *images;
  long long *points;
  int views;                        // 0: one image per sample; V: V views per sample, view-major (V * count)
  const long long *canvas_keys;     // key of each canvas's plasma: the sample's, or its view key
};

// Per-thread buffers, grown on demand and reused across samples.
struct Scratch {
  std::vector<float> px, py, grid, noise, rows;
  std::vector<u32> masks, hist, stamped;
  std::vector<float> g;
  std::vector<unsigned char> object;
};

template <typename T>
T *sized(std::vector<T> &v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------- Philox, 8 blocks at once

// Words of 8 Philox4x32-10 blocks whose counters share the index words: counter (c0, c1, c2[l], c3[l]),
// word i of block l at w[i][l]. The AVX2 version runs the 8 blocks in vector registers (the same integer
// operations, so the same words); chosen once per process by what the CPU supports.
struct Words8 {
  u32 w[4][8];
};
typedef void (*Philox8)(u32 c0, u32 c1, const u32 *c2, const u32 *c3, u32 k0, u32 k1, Words8 &out);

void philox8_scalar(u32 c0, u32 c1, const u32 *c2, const u32 *c3, u32 k0, u32 k1, Words8 &out) {
  for (int l = 0; l < 8; ++l) {
    const Words r = philox4x32(c0, c1, c2[l], c3[l], k0, k1);
    for (int i = 0; i < 4; ++i) out.w[i][l] = r.w[i];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// mulhilo of 8 lanes: _mm256_mul_epu32 multiplies the even 32-bit lanes into 64-bit products.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i x, __m256i &hi, __m256i &lo) {
  const __m256i even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void philox8_avx2(u32 c0, u32 c1, const u32 *c2, const u32 *c3, u32 k0, u32 k1,
                                                  Words8 &out) {
  __m256i x0 = _mm256_set1_epi32((int)c0), x1 = _mm256_set1_epi32((int)c1);
  __m256i x2 = _mm256_loadu_si256((const __m256i *)c2), x3 = _mm256_loadu_si256((const __m256i *)c3);
  __m256i key0 = _mm256_set1_epi32((int)k0), key1 = _mm256_set1_epi32((int)k1);
  const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u), m1 = _mm256_set1_epi32((int)0xCD9E8D57u);
  const __m256i w0 = _mm256_set1_epi32((int)0x9E3779B9u), w1 = _mm256_set1_epi32((int)0xBB67AE85u);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, x0, hi0, lo0);
    mulhilo8(m1, x2, hi1, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), key0);
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), key1);
    x1 = lo1;
    x3 = lo0;
    key0 = _mm256_add_epi32(key0, w0);
    key1 = _mm256_add_epi32(key1, w1);
  }
  _mm256_storeu_si256((__m256i *)out.w[0], x0);
  _mm256_storeu_si256((__m256i *)out.w[1], x1);
  _mm256_storeu_si256((__m256i *)out.w[2], x2);
  _mm256_storeu_si256((__m256i *)out.w[3], x3);
}
#endif

Philox8 philox8() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Philox8 best = __builtin_cpu_supports("avx2") ? philox8_avx2 : philox8_scalar;
  return best;
#else
  return philox8_scalar;
#endif
}

// ---------------------------------------------------------------- chaos game (reference.chaos_game)

// LANES chains of an item run in lockstep (independent dependency chains: the core overlaps their Philox
// rounds and map applications). Map choice: the count of the first T thresholds cum[m] that u passes
// (thr[m] = 2 beyond the item's nmaps - 1 thresholds: never passed, as in the reference). Recorded points
// are appended to px, py (and masks) branch-free: the buffers have LANES words of slack.
template <bool POINT_MASKS, int LANES, int T>
inline bool run_lanes(const Batch &bt, long long index, int slot, int chain0, const float *f, const float *thr,
                      float *px, float *py, u32 *masks, long long &n) {
  const int chains = bt.ri[RI_CHAINS], burn_in = bt.ri[RI_BURN_IN], num_points = bt.ri[RI_NUM_POINTS];
  const int steps = burn_in + (num_points + chains - 1) / chains;
  constexpr int per_call = POINT_MASKS ? 2 : 4;  // steps served by one Philox call
  float x[LANES], y[LANES];
  for (int l = 0; l < LANES; ++l) x[l] = f[IF_START], y[l] = f[IF_START + 1];
  static_assert(LANES == 1 || LANES == 8, "Philox8 serves 8 lanes");
  const Philox8 philox = philox8();
  u32 tags[8], draws[8];
  for (int l = 0; l < LANES; ++l) tags[l] = make_tag(STREAM_CHAOS, (u32)slot, (u32)(chain0 + l));
  const u64 key = (u64)index;
  for (int s0 = 0; s0 < steps; s0 += per_call) {
    Words8 w;  // word i of lane l: w.w[i][l]
    const u32 draw = (u32)(s0 / per_call);
    if (LANES == 8) {
      for (int l = 0; l < 8; ++l) draws[l] = draw;
      philox((u32)key, (u32)(key >> 32), tags, draws, bt.seed, bt.epoch, w);
    } else {
      const Words one = draw_words(bt.seed, bt.epoch, index, tags[0], draw);
      for (int i = 0; i < 4; ++i) w.w[i][0] = one.w[i];
    }
    for (int j = 0; j < per_call && s0 + j < steps; ++j) {
      const int step = s0 + j;
      const long long first = (long long)(step - burn_in) * chains + chain0;  // point number of lane 0
      for (int l = 0; l < LANES; ++l) {
        const float u = to_uniform(POINT_MASKS ? w.w[2 * j][l] : w.w[j][l]);
        int k = 0;
        for (int m = 0; m < T; ++m) k += u >= thr[m] ? 1 : 0;
        const float *r = f + k * ROW;
        const float nx = (r[0] * x[l] + r[1] * y[l]) + r[2];
        const float ny = (r[3] * x[l] + r[4] * y[l]) + r[5];
        x[l] = nx;
        y[l] = ny;
        px[n] = nx;
        py[n] = ny;
        if (POINT_MASKS) masks[n] = 1u + (u32)to_int(w.w[2 * j + 1][l], 511);
        n += (step >= burn_in && first + l < num_points) ? 1 : 0;
      }
    }
  }
  bool ok = true;
  for (int l = 0; l < LANES; ++l) ok = ok && finite(x[l]) && finite(y[l]);
  return ok;
}

constexpr int CHAIN_LANES = 8;

// All chains of an item, 8 at a time, the rest one by one; false when any chain escaped. (An AVX2 clone of
// this loop, Philox of 8 lanes vectorised by GCC, measured 30% slower: it stays scalar.)
template <bool POINT_MASKS>
inline bool run_all(const Batch &bt, long long index, int slot, const float *f, const float *thr, int thresholds,
                    float *px, float *py, u32 *masks, long long &n) {
  const int chains = bt.ri[RI_CHAINS];
  bool ok = true;
  int chain = 0;
  for (; chain + CHAIN_LANES <= chains; chain += CHAIN_LANES)
    ok = (thresholds <= 3 ? run_lanes<POINT_MASKS, CHAIN_LANES, 3>(bt, index, slot, chain, f, thr, px, py, masks, n)
                          : run_lanes<POINT_MASKS, CHAIN_LANES, MAX_MAPS - 1>(bt, index, slot, chain, f, thr, px, py,
                                                                              masks, n)) && ok;
  for (; chain < chains; ++chain)
    ok = run_lanes<POINT_MASKS, 1, MAX_MAPS - 1>(bt, index, slot, chain, f, thr, px, py, masks, n) && ok;
  return ok;
}

// Runs every chain of an item and stores its recorded points (and, with 'point' patches, their mask
// words); returns the number recorded: 0 when any chain escapes (non-finite point). A non-finite
// coordinate makes every later point non-finite (chaos.cu run_chain_with), so checking each chain's last
// point is the reference's per-step check.
template <bool POINT_MASKS>
STAGE long long chaos_game(const Batch &bt, long long index, int slot, const int *ii, const float *f, Scratch &s) {
  const int num_points = bt.ri[RI_NUM_POINTS];
  const int thresholds = std::min(ii[3] - 1, MAX_MAPS - 1);
  float thr[MAX_MAPS - 1];
  for (int m = 0; m < MAX_MAPS - 1; ++m) thr[m] = m < thresholds ? f[IF_CUM + m] : 2.0f;
  float *px = sized(s.px, num_points + CHAIN_LANES), *py = sized(s.py, num_points + CHAIN_LANES);
  u32 *masks = POINT_MASKS ? sized(s.masks, num_points + CHAIN_LANES) : nullptr;
  long long n = 0;
  const bool ok = run_all<POINT_MASKS>(bt, index, slot, f, thr, thresholds, px, py, masks, n);
  return ok ? n : 0;
}

// ---------------------------------------------------------------- window (reference.window)

// [xmin, xmax, ymin, ymax] of n >= 1 finite points (min / max: any order gives the same floats).
TARGETS void bounding_box(const float *px, const float *py, long long n, float box[4]) {
  float x0 = px[0], x1 = px[0], y0 = py[0], y1 = py[0];
  for (long long i = 1; i < n; ++i) {
    x0 = px[i] < x0 ? px[i] : x0;
    x1 = px[i] > x1 ? px[i] : x1;
    y0 = py[i] < y0 ? py[i] : y0;
    y1 = py[i] > y1 ? py[i] : y1;
  }
  box[0] = x0, box[1] = x1, box[2] = y0, box[3] = y1;
}

STAGE void window(const float *px, const float *py, long long n, const float *f, int side, float lo[2],
                  float sc[2]) {
  if (n == 0) {
    lo[0] = lo[1] = 0.0f;
    sc[0] = sc[1] = (float)(side - 1);
    return;
  }
  float box[4];
  bounding_box(px, py, n, box);
  for (int axis = 0; axis < 2; ++axis) {
    const float mn = box[2 * axis], mx = box[2 * axis + 1];
    const float extent = mx - mn;
    const float half = (extent * f[IF_SCALE + axis]) * 0.5f;
    const float start = mn + ((extent * 0.5f + extent * f[IF_SHIFT + axis]) - half);
    const float span = half + half;
    const float pixels = (float)(side - 1) / span;
    const bool bad = !(span > 0.0f) || !finite(pixels) || !finite(start);
    lo[axis] = bad ? mn : start;
    sc[axis] = bad ? (float)(side - 1) : pixels;
  }
}

// ---------------------------------------------------------------- density (histogram, stamp)

// Histogram of the points inside the window: per-pixel counts, or the OR of the points' masks ('point'
// patches: masks != nullptr); hist has row pitch `pitch`.
TARGETS void bin_points(const float *px, const float *py, const u32 *masks, long long n, const float lo[2],
                        const float sc[2], int side, u32 *hist, size_t pitch) {
  const float fside = (float)side;
  for (long long i = 0; i < n; ++i) {
    const float vr = (px[i] - lo[0]) * sc[0];
    const float vc = (py[i] - lo[1]) * sc[1];
    if (vr >= 0.0f && vr < fside && vc >= 0.0f && vc < fside) {
      const size_t at = (size_t)(int)vr * pitch + (size_t)(int)vc;
      if (masks) hist[at] |= masks[i];
      else hist[at] += 1u;
    }
  }
}

// One bit of the stamp: stamped += source plane (graded), or |= its bit `bit` ('point' masks).
TARGETS void stamp_plane(const u32 *src, size_t pitch, u32 *stamped, int side, int bit) {
  for (int r = 0; r < side; ++r) {
    const u32 *in = src + (size_t)r * pitch;
    u32 *out = stamped + (size_t)r * side;
    if (bit < 0)
      for (int c = 0; c < side; ++c) out[c] += in[c];
    else
      for (int c = 0; c < side; ++c) out[c] |= (in[c] >> bit) & 1u;
  }
}

// count / max (float32 division), or 1 where any point landed.
TARGETS void to_density(const u32 *stamped, size_t pixels, bool binary, float *g) {
  if (binary) {
    for (size_t q = 0; q < pixels; ++q) g[q] = stamped[q] > 0 ? 1.0f : 0.0f;
    return;
  }
  u32 peak = 0;
  for (size_t q = 0; q < pixels; ++q) peak = stamped[q] > peak ? stamped[q] : peak;
  const float fpeak = (float)peak;
  for (size_t q = 0; q < pixels; ++q) g[q] = peak > 0 ? (float)stamped[q] / fpeak : 0.0f;
}

// Density g (side x side, float32) of an item: histogram of the points, 3x3 stamp, count / max or binary.
// The histogram has a zero border of one pixel, so the stamp is nine shifted whole-row passes.
template <bool POINT_MASKS>
STAGE float *density(const Batch &bt, const int *ii, long long n, const float lo[2],
                                         const float sc[2], int side, Scratch &s) {
  const size_t pitch = side + 2, pixels = (size_t)side * side;
  u32 *hist = sized(s.hist, pitch * pitch);
  std::fill(hist, hist + pitch * pitch, 0u);
  bin_points(s.px.data(), s.py.data(), POINT_MASKS ? s.masks.data() : nullptr, n, lo, sc, side, hist + pitch + 1,
             pitch);
  // Stamp: target (r, c) takes source (r - dr + 1, c - dc + 1) for each set bit dr * 3 + dc.
  u32 *stamped = sized(s.stamped, pixels);
  std::fill(stamped, stamped + pixels, 0u);
  const u32 mask = POINT_MASKS ? 0x1ffu : (u32)ii[5];
  for (int bit = 0; bit < 9; ++bit) {
    if (!((mask >> bit) & 1u)) continue;
    const int dr = bit / 3, dc = bit % 3;
    stamp_plane(hist + (size_t)(2 - dr) * pitch + (2 - dc), pitch, stamped, side, POINT_MASKS ? bit : -1);
  }
  float *g = sized(s.g, pixels);
  to_density(stamped, pixels, POINT_MASKS || bt.ri[RI_BINARY], g);
  return g;
}

// Flips and colour of an item (reference.flip, colorize): rgb written to out (side x side x 3) where g > 0.
STAGE void colour_item(const Batch &bt, const int *ii, const float *f, const float *g, int side,
                       unsigned char *out) {
  const int bits = ii[6];
  const bool color = bt.ri[RI_COLOR];
  const float grey = (float)bt.ri[RI_GREY];
  const float hue_shift = f[IF_HUE];
  unsigned char table[256][3];
  if (color)
    for (int h8 = 0; h8 < 256; ++h8) hsv_to_rgb(h8, ii[7], ii[8], table[h8]);
  for (int r = 0; r < side; ++r) {
    const int rr = (bits & 2) ? side - 1 - r : r;
    for (int c = 0; c < side; ++c) {
      const int cc = (bits & 4) ? side - 1 - c : c;
      const float v = (bits & 1) ? g[(size_t)cc * side + rr] : g[(size_t)rr * side + cc];
      if (!(v > 0.0f)) continue;
      unsigned char *px = out + ((size_t)r * side + c) * 3;
      if (color) {
        const float hue = v * 255.0f + hue_shift;
        const unsigned char *rgb = table[((int)floorf(hue)) & 255];
        px[0] = rgb[0];
        px[1] = rgb[1];
        px[2] = rgb[2];
      } else {
        px[0] = px[1] = px[2] = (unsigned char)(v * grey);
      }
    }
  }
}

// The density of an item (in s.g; nullptr when it draws nothing: inactive, or every chain escaped) and its
// recorded point count n.
const float *item_density(const Batch &bt, long long index, int slot, const int *ii, const float *f, int side,
                          Scratch &s, long long &n) {
  n = 0;
  if (!ii[0]) return nullptr;  // inactive: records nothing, draws nothing
  const bool point_masks = bt.ri[RI_PATCH] == PATCH_POINT;
  n = point_masks ? chaos_game<true>(bt, index, slot, ii, f, s) : chaos_game<false>(bt, index, slot, ii, f, s);
  if (n == 0) return nullptr;  // background only
  float lo[2], sc[2];
  window(s.px.data(), s.py.data(), n, f, side, lo, sc);
  return point_masks ? density<true>(bt, ii, n, lo, sc, side, s) : density<false>(bt, ii, n, lo, sc, side, s);
}

// One item, start to end: returns its recorded point count.
long long render_item(const Batch &bt, long long index, int slot, const int *ii, const float *f, int side,
                      unsigned char *out, Scratch &s) {
  long long n;
  const float *g = item_density(bt, index, slot, ii, f, side, s, n);
  if (g) colour_item(bt, ii, f, g, side, out);
  return n;
}

// ---------------------------------------------------------------- background (reference.plasma, background)

// Noise of every plasma grid cell (draw = cell), 8 cells per Philox8 call.
void plasma_noise(u32 seed, u32 epoch, long long index, int cells, float *out) {
  const u32 tag = make_tag(STREAM_PLASMA, 0, 0);
  const u32 lo = (u32)(u64)index, hi = (u32)((u64)index >> 32);
  const Philox8 philox = philox8();
  u32 tags[8], draws[8];
  Words8 w;
  for (int l = 0; l < 8; ++l) tags[l] = tag;
  int i = 0;
  for (; i + 8 <= cells; i += 8) {
    for (int l = 0; l < 8; ++l) draws[l] = (u32)(i + l);
    philox(lo, hi, tags, draws, seed, epoch, w);
    for (int l = 0; l < 8; ++l) out[i + l] = to_uniform(w.w[0][l]) * 2.0f - 1.0f;
  }
  for (; i < cells; ++i) out[i] = to_uniform(philox4x32(lo, hi, tag, (u32)i, seed, epoch).w[0]) * 2.0f - 1.0f;
}

// Normalise the crop of the grid to [0, 1] and colour it (reference.background). h8, s8 and v8 are all
// monotone in the plasma value, so an image has at most ~800 distinct (h8, s8, v8): their colours are
// memoised in a small direct-mapped table instead of converting every pixel.
TARGETS void plasma_colour(const float *grid, int n, int size, const float *sf, unsigned char *img) {
  float mn = grid[0], mx = grid[0];
  for (int r = 0; r < size; ++r)
    for (int c = 0; c < size; ++c) {
      const float v = grid[(size_t)r * n + c];
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
  constexpr int SLOTS = 4096;
  u64 keys[SLOTS];
  unsigned char colours[SLOTS][3];
  std::fill(keys, keys + SLOTS, ~0ull);
  for (int r = 0; r < size; ++r)
    for (int c = 0; c < size; ++c) {
      const float x = mx > mn ? (grid[(size_t)r * n + c] - mn) / (mx - mn) : 0.0f;
      const int h8 = ((int)floorf(x * sf[9] + sf[10])) & 255;
      const int s8 = (int)(x * sf[11] + sf[12]);
      const int v8 = (int)(x * sf[13] + sf[14]);
      const u64 key = (u64)(u32)h8 | (u64)(u32)s8 << 21 | (u64)(u32)v8 << 42;
      const int slot = (int)((key ^ (key >> 19) ^ (key >> 37)) & (SLOTS - 1));
      if (keys[slot] != key) {
        keys[slot] = key;
        hsv_to_rgb(h8, s8, v8, colours[slot]);
      }
      std::memcpy(img + ((size_t)r * size + c) * 3, colours[slot], 3);
    }
}

// Diamond-square plasma (reference.plasma), coloured into img.
STAGE void background(const Batch &bt, long long index, const float *sf, unsigned char *img,
                                          Scratch &s) {
  const int size = bt.ri[RI_SIZE];
  int bits = 1;
  while ((1 << bits) < size) ++bits;  // plasma_grid_size: 2^max(1, ceil(log2 size)) + 1
  const int n = (1 << bits) + 1, last = n - 1;
  float *grid = sized(s.grid, (size_t)n * n);
  float *noise = sized(s.noise, (size_t)n * n);
  plasma_noise(bt.seed, bt.epoch, index, n * n, noise);
  auto at = [&](int r, int c) -> float & { return grid[(size_t)r * n + c]; };
  at(0, 0) = sf[5];
  at(0, last) = sf[6];
  at(last, 0) = sf[7];
  at(last, last) = sf[8];
  float amp = 0.5f;
  for (int step = last; step > 1; step /= 2) {
    const int half = step / 2;
    for (int r = half; r < n; r += step)  // diamond step: centres of squares
      for (int c = half; c < n; c += step) {
        const float top = at(r - half, c - half) + at(r - half, c + half);
        const float bottom = at(r + half, c - half) + at(r + half, c + half);
        at(r, c) = (top + bottom) * 0.25f + noise[(size_t)r * n + c] * amp;
      }
    for (int r0 = 0; r0 <= half; r0 += half) {  // square step: neighbours up, left, right, down
      const int c0 = half - r0;
      for (int r = r0; r < n; r += step)
        for (int c = c0; c < n; c += step) {
          const int dr[4] = {-half, 0, 0, half}, dc[4] = {0, -half, half, 0};
          float total = 0.0f, count = 0.0f;
          for (int k = 0; k < 4; ++k) {
            const int rr = r + dr[k], cc = c + dc[k];
            const bool ok = rr >= 0 && rr < n && cc >= 0 && cc < n;
            total = total + (ok ? at(rr, cc) : 0.0f);
            count = count + (ok ? 1.0f : 0.0f);
          }
          at(r, c) = total / count + noise[(size_t)r * n + c] * amp;
        }
    }
    amp = amp * sf[4];
  }
  plasma_colour(grid, n, size, sf, img);
}

// ---------------------------------------------------------------- composition (paste_objects, blur)

STAGE void paste(const int *ii, const unsigned char *obj, int src, int size, unsigned char *img) {
  const int side = ii[9], top = ii[10], left = ii[11];
  const int r0 = std::max(top, 0), r1 = std::min(top + side, size);
  const int c0 = std::max(left, 0), c1 = std::min(left + side, size);
  if (r0 >= r1 || c0 >= c1) return;
  const float ratio = (float)src / (float)side;
  struct Tap { int lower, upper; float frac; };
  auto tap = [&](int dst) {
    float pos = ((float)dst + 0.5f) * ratio - 0.5f;
    pos = std::max(pos, 0.0f);
    const int lower = std::min((int)floorf(pos), src - 1);
    return Tap{lower, std::min(lower + 1, src - 1), pos - (float)lower};
  };
  std::vector<Tap> cols(c1 - c0);
  for (int c = c0; c < c1; ++c) cols[c - c0] = tap(c - left);
  for (int r = r0; r < r1; ++r) {
    const Tap tr = tap(r - top);
    const float wr = 1.0f - tr.frac;
    for (int c = c0; c < c1; ++c) {
      const Tap tc = cols[c - c0];
      const float wc = 1.0f - tc.frac;
      unsigned char rgb[3];
      bool any = false;
      for (int ch = 0; ch < 3; ++ch) {
        const float p00 = obj[((size_t)tr.lower * src + tc.lower) * 3 + ch];
        const float p01 = obj[((size_t)tr.lower * src + tc.upper) * 3 + ch];
        const float p10 = obj[((size_t)tr.upper * src + tc.lower) * 3 + ch];
        const float p11 = obj[((size_t)tr.upper * src + tc.upper) * 3 + ch];
        const float top_row = p00 * wc + p01 * tc.frac;
        const float bottom_row = p10 * wc + p11 * tc.frac;
        rgb[ch] = round_u8(top_row * wr + bottom_row * tr.frac);
        any = any || rgb[ch] > 0;
      }
      if (any) std::memcpy(img + ((size_t)r * size + c) * 3, rgb, 3);
    }
  }
}

inline int reflect101(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

TARGETS void blur(const float *sf, int size, unsigned char *img, Scratch &s) {
  const float k0 = sf[1], k1 = sf[2];
  float *rows = sized(s.rows, (size_t)size * size * 3);
  for (int r = 0; r < size; ++r)
    for (int c = 0; c < size; ++c) {
      const unsigned char *row = img + (size_t)r * size * 3;
      const int left = reflect101(c - 1, size) * 3, mid = c * 3, right = reflect101(c + 1, size) * 3;
      for (int ch = 0; ch < 3; ++ch)
        rows[((size_t)r * size + c) * 3 + ch] =
            (k1 * (float)row[left + ch] + k0 * (float)row[mid + ch]) + k1 * (float)row[right + ch];
    }
  for (int r = 0; r < size; ++r) {
    const float *above = rows + (size_t)reflect101(r - 1, size) * size * 3, *here = rows + (size_t)r * size * 3,
                *below = rows + (size_t)reflect101(r + 1, size) * size * 3;
    unsigned char *out = img + (size_t)r * size * 3;
    for (int q = 0; q < size * 3; ++q) out[q] = round_u8((k1 * above[q] + k0 * here[q]) + k1 * below[q]);
  }
}

// Canvas c (a sample, or a view of one): its plasma keyed by canvas_keys[c], or black.
unsigned char *canvas(const Batch &bt, long long c, const float *sf, Scratch &s) {
  const int size = bt.ri[RI_SIZE];
  unsigned char *img = bt.images + (size_t)c * size * size * 3;
  if (bt.ri[RI_BACKGROUND]) background(bt, bt.canvas_keys[c], sf, img, s);
  else std::memset(img, 0, (size_t)size * size * 3);
  return img;
}

// The views of sample b (reference.render_items + compose of params.plan_views' view items): view items
// c = v * count + b share the fractal (system, jitter, window, patch, slot 0: every field but the look), so
// the chaos game and density run once, from view 0's item; each view colours it with its own flips and
// colours into a full-size object, pasted at its own size and position onto its own canvas, then blurred.
void render_views(const Batch &bt, int b, Scratch &s) {
  const int size = bt.ri[RI_SIZE], side = bt.ri[RI_SIDE];
  long long n;
  const float *g = item_density(bt, bt.indices[b], 0, bt.item_i + (size_t)b * ITEM_INTS,
                                bt.item_f + (size_t)b * ITEM_FLOATS, side, s, n);
  for (int v = 0; v < bt.views; ++v) {
    const long long c = (long long)v * bt.count + b;
    const int *ii = bt.item_i + (size_t)c * ITEM_INTS;
    const float *f = bt.item_f + (size_t)c * ITEM_FLOATS;
    const float *sf = bt.sample_f + (size_t)c * SAMPLE_FLOATS;
    unsigned char *img = canvas(bt, c, sf, s);
    bt.points[c] = n;
    if (g) {  // an object without points is black: pasting it changes nothing
      unsigned char *obj = sized(s.object, (size_t)side * side * 3);
      std::memset(obj, 0, (size_t)side * side * 3);
      colour_item(bt, ii, f, g, side, obj);
      paste(ii, obj, side, size, img);
    }
    if (sf[0] > 0.0f) blur(sf, size, img, s);
  }
}

void render_sample(const Batch &bt, int b, Scratch &s) {
  if (bt.views) return render_views(bt, b, s);
  const int *ri = bt.ri;
  const int size = ri[RI_SIZE], side = ri[RI_SIDE], slots = ri[RI_SLOTS];
  const long long index = bt.indices[b];
  const float *sf = bt.sample_f + (size_t)b * SAMPLE_FLOATS;
  unsigned char *img = canvas(bt, b, sf, s);
  for (int slot = 0; slot < slots; ++slot) {
    const int item = b * slots + slot;
    const int *ii = bt.item_i + (size_t)item * ITEM_INTS;
    const float *f = bt.item_f + (size_t)item * ITEM_FLOATS;
    if (!ri[RI_MULTI_OBJECT]) {
      bt.points[item] = render_item(bt, index, slot, ii, f, side, img, s);
      continue;
    }
    unsigned char *obj = sized(s.object, (size_t)side * side * 3);
    std::memset(obj, 0, (size_t)side * side * 3);
    bt.points[item] = render_item(bt, index, slot, ii, f, side, obj, s);
    if (ii[0]) paste(ii, obj, side, size, img);
  }
  if (sf[0] > 0.0f) blur(sf, size, img, s);
}

}  // namespace

// Renders `count` samples into images (count x size x size x 3) and points (count x slots) on `threads`
// threads (samples taken in turn from a shared counter; each sample's bytes depend only on its key).
// Two-view recipes (views > 0): sample_f, item_i, item_f, images and points hold views * count canvases,
// view-major, and view_keys their plasma keys (params.view_keys). Returns 0, or 1 when a thread failed
// (out of memory).
extern "C" __attribute__((visibility("default"))) int render_batch(
    int count, const long long *indices, u32 seed, u32 epoch, const int *ri, const float *sample_f,
    const int *item_i, const float *item_f, unsigned char *images, long long *points, int threads, int views,
    const long long *view_keys) {
  const Batch bt{count, indices, seed, epoch, ri, sample_f, item_i, item_f, images, points, views,
                 views ? view_keys : indices};
  std::atomic<int> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      Scratch s;
      for (int b = next++; b < count && !failed; b = next++) render_sample(bt, b, s);
    } catch (const std::exception &) {
      failed = true;
    }
  };
  threads = std::max(1, std::min(threads, count));
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  } catch (const std::exception &) {
    // could not start more threads: the ones running and this one finish the batch
  }
  work();
  for (auto &t : pool) t.join();
  return failed ? 1 : 0;
}
