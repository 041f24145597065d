// One block renders one fractal item (mirrors reference.render_items): blockDim.x = chains.
//   pass 1: every thread runs its chain, the block reduces the bounding box; thread 0 sets the window;
//   pass 2: the chains run again (same maps, same floats) and bin their points: replayed from the map
//   choices pass 1 stored (render_items), or drawn again with each point's mask (render_items_point_masks);
//   then the 3x3 patch stamp (a window sliding along each column, or each row where the flips transpose),
//   the peak, colour from a per-item table, and each pixel written where the flips send it, to the canvas
//   or the object buffer.
// Hot pixels (one pixel can take 18% of all points): lanes of a warp that hit the same pixel in the
// same step are merged with __match_any_sync into one atomicAdd; the histogram lives in shared memory
// when it fits (dynamic shared size = side * (side + 1) * 4 bytes: rows padded by a word so that lanes
// walking adjacent rows hit different banks) and in a global scratch otherwise.
#include "common.cuh"

#define F_INF __int_as_float(0x7f800000)

__device__ inline void apply_map(const float *r, float &x, float &y) {
  float nx = (r[0] * x + r[1] * y) + r[2];
  float ny = (r[3] * x + r[4] * y) + r[5];
  x = nx;
  y = ny;
}

// Word `step` of a chain's stream picks the map (reference.chaos_words, chaos_game): the number of
// cumulative thresholds cum[j] (j < nmaps - 1) that u = (word >> 8) * 2^-24 passes. As integers:
// u >= cum iff (word >> 8) >= ceil(cum * 2^24) (a 24-bit integer and a power-of-two scaling, both exact),
// so the draw needs no float conversion; NaN and cum >= 1 are never passed, cum <= 0 always.
#define NEVER_PASSED (1u << 24)
__device__ inline u32 map_threshold(float cum) {
  if (!(cum < 1.0f)) return NEVER_PASSED;
  if (!(cum > 0.0f)) return 0u;
  return (u32)ceilf(cum * 16777216.0f);
}

// This thread's chain of an item: its maps, thresholds and start (shared memory) and its Philox key.
struct Chain {
  const float *params;
  int nmaps, steps;
  u32 seed, epoch, tag;
  long long index;
};

// A point's own patch mask word ('point' patches); `on` is a compile-time constant once inlined.
struct PointMask {
  bool on;
  u32 word;
};

// Pass 1 stores each step's map so that pass 2 replays the chain without drawing again: `bits` per step
// (2 for systems of up to 4 maps, else 4), `per_word` steps per word, word w of a chain at column[w * chains]
// (a warp's words are adjacent). Items are choice_words * chains words apart: the host sizes choice_words for
// the bank's largest system (cupy_renderer.py).
template <int NUM_THRESHOLDS>
struct Packing {
  static constexpr int bits = NUM_THRESHOLDS <= 3 ? 2 : 4;
  static constexpr int per_word = 32 / bits;
};

// Runs this thread's chain and calls visit(step, x, y, PointMask) after every map; returns whether the last
// point is finite. That is whether every point was: a non-finite coordinate makes both coordinates of every
// later point non-finite (x * inf is +-inf or NaN, NaN propagates, inf - inf is NaN). One Philox call
// serves four steps, or two when every point also draws a patch-mask word. Only the first NUM_THRESHOLDS
// thresholds are compared (3 for systems of up to 4 maps, the common case). Without point masks the map
// choices are stored in `column` for replay_chain_with. Template parameters, so that each instantiation's
// loop holds only what it uses (64 registers at most).
template <int NUM_THRESHOLDS, bool PER_POINT, typename Visit>
__device__ inline bool run_chain_with(const Chain &chain, u32 *column, int stride, Visit visit) {
  using Pack = Packing<NUM_THRESHOLDS>;
  const float *params = chain.params;
  u32 threshold[NUM_THRESHOLDS];
#pragma unroll
  for (int j = 0; j < NUM_THRESHOLDS; ++j)
    threshold[j] = j < chain.nmaps - 1 ? map_threshold(params[IF_CUM + j]) : NEVER_PASSED;
  float x = params[IF_START], y = params[IF_START + 1];
  u32 packed = 0;
  constexpr int per_call = PER_POINT ? 2 : 4;  // divides Pack::per_word
  for (int s0 = 0; s0 < chain.steps; s0 += per_call) {
    const Words w = draw_words(chain.seed, chain.epoch, chain.index, chain.tag, (u32)(s0 / per_call));
    const int shift = Pack::bits * (s0 % Pack::per_word);
#pragma unroll
    for (int j = 0; j < per_call; ++j) {
      const int s = s0 + j;
      if (s >= chain.steps) break;
      const u32 draw = (PER_POINT ? w.w[2 * j] : w.w[j]) >> 8;
      int k = 0;
#pragma unroll
      for (int m = 0; m < NUM_THRESHOLDS; ++m) k += draw >= threshold[m] ? 1 : 0;
      apply_map(params + k * ROW, x, y);
      visit(s, x, y, PointMask{PER_POINT, PER_POINT ? w.w[2 * j + 1] : 0u});
      if (!PER_POINT) packed |= (u32)k << (shift + Pack::bits * j);
    }
    if (!PER_POINT && ((s0 + per_call) % Pack::per_word == 0 || s0 + per_call >= chain.steps)) {
      column[(s0 / Pack::per_word) * stride] = packed;
      packed = 0;
    }
  }
  return finite(x) && finite(y);
}

// The chain again from its stored map choices: the same points as run_chain_with, no Philox, no thresholds.
template <int NUM_THRESHOLDS, typename Visit>
__device__ inline void replay_chain_with(const Chain &chain, const u32 *column, int stride, Visit visit) {
  using Pack = Packing<NUM_THRESHOLDS>;
  float x = chain.params[IF_START], y = chain.params[IF_START + 1];
  for (int s0 = 0; s0 < chain.steps; s0 += Pack::per_word) {
    u32 word = column[(s0 / Pack::per_word) * stride];
#pragma unroll 4
    for (int j = 0; j < Pack::per_word; ++j) {
      const int s = s0 + j;
      if (s >= chain.steps) break;
      apply_map(chain.params + (word & ((1u << Pack::bits) - 1)) * ROW, x, y);
      word >>= Pack::bits;
      visit(s, x, y, PointMask{false, 0u});
    }
  }
}

template <bool PER_POINT, typename Visit>
__device__ inline bool run_chain(const Chain &chain, u32 *column, int stride, Visit visit) {
  if (chain.nmaps <= 4) return run_chain_with<3, PER_POINT>(chain, column, stride, visit);
  return run_chain_with<MAX_MAPS - 1, PER_POINT>(chain, column, stride, visit);
}

template <typename Visit>
__device__ inline void replay_chain(const Chain &chain, const u32 *column, int stride, Visit visit) {
  if (chain.nmaps <= 4) replay_chain_with<3>(chain, column, stride, visit);
  else replay_chain_with<MAX_MAPS - 1>(chain, column, stride, visit);
}

// The 3x3 neighbourhood of a pixel, in the coordinates of a walk along a line of the histogram: a column
// (ALONG_ROWS false: along = r, across = c) or a row (true: along = c, across = r). Entry
// v[da][dx] = hist at (along + 1 - da, across + 1 - dx), zero outside, so that walking down a column
// v[dr][dc] = hist[r + 1 - dr][c + 1 - dc] is what patch bit dr * 3 + dc adds (reference.stamp); along a
// row the same neighbour is v[dc][dr]. A thread slides the window along its line: one new line of three
// reads per pixel instead of nine.
struct Window {
  u32 v[3][3];
};

// An item's histogram: side x side counts, `pitch` words per row (side + 1 in shared memory, else side).
struct Histogram {
  u32 *counts;
  int side, pitch;
  __device__ u32 &at(int r, int c) const { return counts[r * pitch + c]; }
};

// The line at `along` that enters the window of (along - 1, across): hist at (along, across + 1 - dx).
template <bool ALONG_ROWS>
__device__ inline void read_line(const Histogram &hist, int along, int across, u32 *line) {
  const int side = hist.side;
  const bool in = along >= 0 && along < side;
  const int a = in ? along : 0;
#pragma unroll
  for (int dx = 0; dx < 3; ++dx) {
    const int x = across + 1 - dx;
    const bool inside = in && (dx != 0 || x < side) && (dx != 2 || x >= 0);
    line[dx] = inside ? (ALONG_ROWS ? hist.at(x, a) : hist.at(a, x)) : 0u;
  }
}

template <bool ALONG_ROWS>
__device__ inline void window_at(const Histogram &hist, int along, int across, Window &win) {
#pragma unroll
  for (int da = 0; da < 3; ++da) read_line<ALONG_ROWS>(hist, along + 1 - da, across, win.v[da]);
}

template <bool ALONG_ROWS>
__device__ inline void window_next(const Histogram &hist, int along, int across, Window &win) {  // to along + 1
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    win.v[2][k] = win.v[1][k];
    win.v[1][k] = win.v[0][k];
  }
  read_line<ALONG_ROWS>(hist, along + 2, across, win.v[0]);
}

// The item's patch: weight[dr * 3 + dc] = 1 where its mask has bit dr * 3 + dc, so that a graded stamp
// is nine multiply-adds; 'point' patches use each neighbour's own mask bits instead (binary).
struct Patch {
  u32 weight[9];
  bool per_point;
};

__device__ inline Patch make_patch(int mask, bool per_point) {
  Patch patch;
#pragma unroll
  for (int bit = 0; bit < 9; ++bit) patch.weight[bit] = (mask >> bit) & 1;
  patch.per_point = per_point;
  return patch;
}

// Stamped count (graded: sum of the masked neighbours) or, per point, 1 if any neighbour's own mask bit
// points at this pixel.
template <bool ALONG_ROWS>
__device__ inline u32 stamped_value(const Window &win, const Patch &patch) {
  u32 total = 0;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int bit = ALONG_ROWS ? j * 3 + i : i * 3 + j;  // the neighbour's (dr, dc)
      if (patch.per_point) total |= win.v[i][j] & (1u << bit);
      else total += win.v[i][j] * patch.weight[bit];
    }
  }
  return patch.per_point ? (total != 0u) : total;
}

// Calls visit(r, c, stamped value) for every pixel of the item's side x side histogram. The pixels are
// split into (line, band) runs, each walked by one thread with a sliding window; a band is the whole line
// when the item is at least as wide as the block, else the block's threads cover side lines x
// (blockDim / side) bands. The lanes of a warp take adjacent lines: walking down columns they read (and
// write, unflipped) adjacent pixels of a row; walking along rows they write adjacent pixels of a
// transposed row, and their reads of adjacent rows hit the cache line the lane read one step before.
template <bool ALONG_ROWS, typename Visit>
__device__ inline void for_each_stamped(const Histogram &hist, const Patch &patch, Visit visit) {
  const int side = hist.side;
  const int bands = side >= (int)blockDim.x ? 1 : (int)blockDim.x / side;
  const int len = (side + bands - 1) / bands;
  for (int run = threadIdx.x; run < side * bands; run += blockDim.x) {
    const int across = run % side, a0 = run / side * len, a1 = min(a0 + len, side);
    Window win;
    if (a0 < a1) window_at<ALONG_ROWS>(hist, a0, across, win);
    for (int along = a0; along < a1; ++along) {
      if (along > a0) window_next<ALONG_ROWS>(hist, along - 1, across, win);
      const u32 value = stamped_value<ALONG_ROWS>(win, patch);
      if (ALONG_ROWS) visit(across, along, value);
      else visit(along, across, value);
    }
  }
}

// Colour each source pixel of one view and write it where its flips send it. Single-object items draw over the
// background already in the canvas.
__device__ inline void write_view(const Histogram &hist, const Patch &patch, bool binary, float peak,
                                  bool colour_table, const u32 *hue_rgb, float hue, float grey, int flips, int side,
                                  int size, int slots, bool multi, long long item, unsigned char *out) {
  const int stride = multi ? side : size;  // pixels per row of the image written
  unsigned char *image = out + (multi ? item * side * side : (item / slots) * (long long)size * size) * 3;
  auto colour = [&](int sr, int sc, u32 v) {
    const float g = binary ? (v > 0 ? 1.0f : 0.0f) : (peak > 0.0f ? (float)v / peak : 0.0f);
    if (!multi && g <= 0.0f) return;
    // Inverse of reference.flip: transpose (bit 1) is its own inverse, so are the reversals (bits 2, 4).
    const int rt = (flips & 1) ? sc : sr, ct = (flips & 1) ? sr : sc;
    const int r = (flips & 2) ? side - 1 - rt : rt;
    const int c = (flips & 4) ? side - 1 - ct : ct;
    u32 rgb = 0;
    if (g > 0.0f) {
      if (colour_table) rgb = hue_rgb[((int)floorf(g * 255.0f + hue)) & 255];
      else rgb = 0x010101u * (unsigned char)(g * grey);
    }
    unsigned char *px = image + (r * stride + c) * 3;
    px[0] = (unsigned char)rgb;
    px[1] = (unsigned char)(rgb >> 8);
    px[2] = (unsigned char)(rgb >> 16);
  };
  // Transposing flips write a source column to a destination row: walk along rows then, so that a warp's
  // writes stay adjacent.
  if (flips & 1) for_each_stamped<true>(hist, patch, colour);
  else for_each_stamped<false>(hist, patch, colour);
}

// The kernels' body; PER_POINT: 'point' patches (each point ORs its own mask into its pixel, binary).
template <bool PER_POINT>
__device__ inline void render_item(const long long *indices, u32 seed, u32 epoch, const int *ri, const int *item_i,
                                   const float *item_f, u32 *hist_global, int use_shared, u32 *choices,
                                   int choice_words, unsigned char *out, int *points, int views) {
  extern __shared__ u32 shared_hist[];
  __shared__ float params[ITEM_FLOATS];
  __shared__ float scratch[1024];
  __shared__ float win[4];  // lo x, lo y, pixels per unit x, y
  __shared__ u32 hue_rgb[256];  // the item's colour of each hue byte, packed r | g << 8 | b << 16
  const int item = blockIdx.x;
  const int slots = ri[RI_SLOTS], side = ri[RI_SIDE], size = ri[RI_SIZE];
  const int chains = ri[RI_CHAINS], burn_in = ri[RI_BURN_IN], num_points = ri[RI_NUM_POINTS];
  const int *ii = item_i + (long long)item * ITEM_INTS;
  // views > 1 (two-view recipes): items [0, gridDim.x) are the fractals, item + v * gridDim.x its view v, which
  // shares the fractal (plan, chain, histogram) and has its own flips, colours and object (params.plan_views).
  const long long view_stride = gridDim.x;
  if (!ii[0]) {  // inactive object slot: nothing to draw
    if (threadIdx.x == 0) points[item] = 0;
    return;
  }
  for (int i = threadIdx.x; i < ITEM_FLOATS; i += blockDim.x) params[i] = item_f[(long long)item * ITEM_FLOATS + i];
  const Histogram hist = use_shared ? Histogram{shared_hist, side, side + 1}
                                    : Histogram{hist_global + (long long)item * side * side, side, side};
  for (int i = threadIdx.x; i < side * hist.pitch; i += blockDim.x) hist.counts[i] = 0u;
  __syncthreads();

  const int steps = burn_in + (num_points + chains - 1) / chains;
  const Chain chain = {params, ii[3], steps, seed, epoch,
                       make_tag(STREAM_CHAOS, (u32)(item % slots), (u32)threadIdx.x), indices[item / slots]};
  u32 *column = choices + (long long)item * choice_words * chains + threadIdx.x;
  // Point p = (step - burn_in) * chains + chain is recorded while p < num_points.
  const int recorded = (int)threadIdx.x < num_points ? (num_points - (int)threadIdx.x + chains - 1) / chains : 0;

  // Pass 1: bounding box of recorded points; any non-finite point makes the item degenerate (then the box
  // is not used).
  float xmin = F_INF, xmax = -F_INF, ymin = F_INF, ymax = -F_INF;
  const bool alive = run_chain<PER_POINT>(chain, column, chains, [&](int s, float x, float y, PointMask) {
    if ((unsigned)(s - burn_in) < (unsigned)recorded) {
      xmin = fminf(xmin, x); xmax = fmaxf(xmax, x);
      ymin = fminf(ymin, y); ymax = fmaxf(ymax, y);
    }
  });
  const bool all_alive = __syncthreads_and(alive);
  xmin = block_reduce(xmin, scratch, false);
  xmax = block_reduce(xmax, scratch, true);
  ymin = block_reduce(ymin, scratch, false);
  ymax = block_reduce(ymax, scratch, true);
  if (threadIdx.x == 0) {  // reference.window
    for (int v = 0; v < views; ++v) points[item + v * view_stride] = all_alive ? num_points : 0;
    float box[4] = {xmin, xmax, ymin, ymax};
    for (int axis = 0; axis < 2; ++axis) {
      float mn = box[2 * axis], mx = box[2 * axis + 1];
      float extent = mx - mn;
      float half = (extent * params[IF_SCALE + axis]) * 0.5f;
      // lo = centre - half, written so that an unshifted, unscaled window starts exactly at mn
      float start = mn + ((extent * 0.5f + extent * params[IF_SHIFT + axis]) - half);
      float span = half + half;
      float pixels = (float)(side - 1) / span;
      bool bad = !(span > 0.0f) || !finite(pixels) || !finite(start) || !all_alive;
      win[axis] = !all_alive ? 0.0f : (bad ? mn : start);
      win[2 + axis] = bad ? (float)(side - 1) : pixels;
    }
  }
  __syncthreads();

  // Pass 2: the same chain again (replayed, or drawn again for point masks), binned. Lanes that land on the
  // same pixel add once, together.
  if (all_alive) {
    const float lo_x = win[0], lo_y = win[1], px_x = win[2], px_y = win[3], edge = (float)side;
    const unsigned lane = threadIdx.x % 32;
    auto bin = [&](int s, float x, float y, PointMask point) {
      int pixel = -1;
      if ((unsigned)(s - burn_in) < (unsigned)recorded) {
        float vr = (x - lo_x) * px_x;
        float vc = (y - lo_y) * px_y;
        if (vr >= 0.0f && vr < edge && vc >= 0.0f && vc < edge) pixel = (int)vr * hist.pitch + (int)vc;
      }
      if (point.on) {
        if (pixel >= 0) atomicOr(&hist.counts[pixel], 1u + (u32)to_int(point.word, 511));
      } else {
        unsigned active = __activemask();
        int key = pixel >= 0 ? pixel : -1 - (int)lane;  // misses never merge
        unsigned same = __match_any_sync(active, key);
        if (pixel >= 0 && lane == (unsigned)(__ffs(same) - 1)) atomicAdd(&hist.counts[pixel], (u32)__popc(same));
      }
    };
    if (PER_POINT) run_chain<true>(chain, column, chains, bin);
    else replay_chain(chain, column, chains, bin);
  }
  __syncthreads();

  // Peak of the stamped counts (graded density = stamped / peak). Item values read only now, not held in
  // registers through the chaos game.
  const Patch patch = make_patch(ii[5], PER_POINT);
  float peak = 0.0f;
  const bool binary = ri[RI_BINARY] || PER_POINT;
  if (!binary) {
    u32 local = 0;
    for_each_stamped<false>(hist, patch, [&](int, int, u32 v) { local = v > local ? v : local; });
    peak = block_reduce((float)local, scratch, true);
  }
  const bool colour_table = ri[RI_COLOR];
  for (int v = 0; v < views; ++v) {
    const long long view_item = item + v * view_stride;
    const int *vi = item_i + view_item * ITEM_INTS;
    const int flips = vi[6];
    // The view's colours as a table: its saturation and value are fixed, so RGB depends on the hue byte only.
    if (colour_table) {
      if (v > 0) __syncthreads();  // every thread is done with the previous view's table
      for (int h8 = threadIdx.x; h8 < 256; h8 += blockDim.x) {
        unsigned char rgb[3];
        hsv_to_rgb(h8, vi[7], vi[8], rgb);
        hue_rgb[h8] = rgb[0] | (u32)rgb[1] << 8 | (u32)rgb[2] << 16;
      }
      __syncthreads();
    }
    const float hue = item_f[view_item * ITEM_FLOATS + IF_HUE];
    write_view(hist, patch, binary, peak, colour_table, hue_rgb, hue, (float)ri[RI_GREY], flips, side, size, slots,
               ri[RI_MULTI_OBJECT], view_item, out);
  }
}

// Up to 1024 threads (recipes.MAX_CHAINS): registers are capped so that any chain count can launch.
extern "C" __global__ void __launch_bounds__(1024)
    render_items(const long long *indices, u32 seed, u32 epoch, const int *ri, const int *item_i, const float *item_f,
                 u32 *hist_global, int use_shared, u32 *choices, int choice_words, unsigned char *out, int *points,
                 int views) {
  render_item<false>(indices, seed, epoch, ri, item_i, item_f, hist_global, use_shared, choices, choice_words, out,
                     points, views);
}

extern "C" __global__ void __launch_bounds__(1024)
    render_items_point_masks(const long long *indices, u32 seed, u32 epoch, const int *ri, const int *item_i,
                             const float *item_f, u32 *hist_global, int use_shared, u32 *choices, int choice_words,
                             unsigned char *out, int *points, int views) {
  render_item<true>(indices, seed, epoch, ri, item_i, item_f, hist_global, use_shared, choices, choice_words, out,
                    points, views);
}
