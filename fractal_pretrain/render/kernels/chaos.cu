// One block renders one fractal item (mirrors reference.render_items): blockDim.x = chains.
//   pass 1: every thread runs its chain, the block reduces the bounding box; thread 0 sets the window;
//   pass 2: the chains run again (same counters, same floats) and bin their points;
//   then the 3x3 patch stamp (a window sliding down each column), the peak, colour, and each pixel
//   written where the flips send it, to the canvas or the object buffer.
// Hot pixels (one pixel can take 18% of all points): lanes of a warp that hit the same pixel in the
// same step are merged with __match_any_sync into one atomicAdd; the histogram lives in shared memory
// when it fits (dynamic shared size = side * side * 4 bytes) and in a global scratch otherwise.
#include "common.cuh"

#define F_INF __int_as_float(0x7f800000)

__device__ inline void apply_map(const float *r, float &x, float &y) {
  float nx = (r[0] * x + r[1] * y) + r[2];
  float ny = (r[3] * x + r[4] * y) + r[5];
  x = nx;
  y = ny;
}

// Runs this thread's chain of an item and calls visit(step, x, y, mask_word) after every map.
// Word `step` of the chain's stream picks the map (reference.chaos_words): one Philox call serves four
// steps, or two when every point also draws a patch-mask word. The map is the number of cumulative
// thresholds the uniform passes; thresholds live in registers, unused ones at 2 (never passed).
template <typename Visit>
__device__ inline void run_chain(const float *params, int nmaps, u32 seed, u32 epoch, long long index, u32 tag,
                                 int steps, bool per_point, Visit visit) {
  float cum[MAX_MAPS - 1];
#pragma unroll
  for (int j = 0; j < MAX_MAPS - 1; ++j) cum[j] = j < nmaps - 1 ? params[IF_CUM + j] : 2.0f;
  float x = params[IF_START], y = params[IF_START + 1];
  const int per_call = per_point ? 2 : 4;
  for (int s0 = 0; s0 < steps; s0 += per_call) {
    const Words w = draw_words(seed, epoch, index, tag, (u32)(s0 / per_call));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int s = s0 + j;
      if (j >= per_call || s >= steps) break;
      const u32 map_word = per_point ? w.w[2 * j] : w.w[j];
      const float u = to_uniform(map_word);
      int k = 0;
#pragma unroll
      for (int m = 0; m < MAX_MAPS - 1; ++m) k += (u >= cum[m]) ? 1 : 0;
      apply_map(params + k * ROW, x, y);
      visit(s, x, y, per_point ? w.w[2 * j + 1] : 0u);
    }
  }
}

// The 3x3 neighbourhood of a pixel, w[dr][dc] = hist[r + 1 - dr][c + 1 - dc] (zero outside), so that
// patch bit dr * 3 + dc adds w[dr][dc] (reference.stamp). Threads slide it down a column: one new row of
// three reads per pixel instead of nine.
struct Window {
  u32 w[3][3];
};

// hist[r][c + 1], hist[r][c], hist[r][c - 1]: the row that enters the window.
__device__ inline void read_row(const u32 *hist, int side, int r, int c, u32 *row) {
  const bool in = r >= 0 && r < side;
  const u32 *h = hist + (in ? r : 0) * side;
  row[0] = in && c + 1 < side ? h[c + 1] : 0u;
  row[1] = in ? h[c] : 0u;
  row[2] = in && c >= 1 ? h[c - 1] : 0u;
}

__device__ inline void window_at(const u32 *hist, int side, int r, int c, Window &win) {
  read_row(hist, side, r + 1, c, win.w[0]);
  read_row(hist, side, r, c, win.w[1]);
  read_row(hist, side, r - 1, c, win.w[2]);
}

__device__ inline void window_down(const u32 *hist, int side, int r, int c, Window &win) {  // to row r + 1
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    win.w[2][k] = win.w[1][k];
    win.w[1][k] = win.w[0][k];
  }
  read_row(hist, side, r + 2, c, win.w[0]);
}

// Stamped count (graded: sum of the masked neighbours) or, per point, any neighbour whose own mask bit
// points at this pixel (binary).
__device__ inline u32 stamped_value(const Window &win, int mask, bool per_point) {
  u32 total = 0;
#pragma unroll
  for (int bit = 0; bit < 9; ++bit) {
    const u32 h = win.w[bit / 3][bit % 3];
    if (per_point) total |= (h >> bit) & 1u;
    else total += ((mask >> bit) & 1) ? h : 0u;
  }
  return total;
}

// Calls visit(r, c, stamped value) for every pixel of the item's side x side histogram. The pixels are
// split into (column, band of rows) runs, each walked top to bottom by one thread with a sliding window:
// a band is the whole height when the item is at least as wide as the block, else the block's threads
// cover side columns x (blockDim / side) bands.
template <typename Visit>
__device__ inline void for_each_stamped(const u32 *hist, int side, int mask, bool per_point, Visit visit) {
  const int bands = side >= (int)blockDim.x ? 1 : (int)blockDim.x / side;
  const int rows = (side + bands - 1) / bands;
  for (int run = threadIdx.x; run < side * bands; run += blockDim.x) {
    const int c = run % side, r0 = run / side * rows, r1 = min(r0 + rows, side);
    Window win;
    if (r0 < r1) window_at(hist, side, r0, c, win);
    for (int r = r0; r < r1; ++r) {
      if (r > r0) window_down(hist, side, r - 1, c, win);
      visit(r, c, stamped_value(win, mask, per_point));
    }
  }
}

// Up to 1024 threads (recipes.MAX_CHAINS): registers are capped so that any chain count can launch.
extern "C" __global__ void __launch_bounds__(1024)
    render_items(const long long *indices, u32 seed, u32 epoch, const int *ri, const int *item_i, const float *item_f,
                 u32 *hist_global, int use_shared, unsigned char *out, int *points) {
  extern __shared__ u32 shared_hist[];
  __shared__ float params[ITEM_FLOATS];
  __shared__ float scratch[1024];
  __shared__ float win[4];  // lo x, lo y, pixels per unit x, y
  const int item = blockIdx.x;
  const int slots = ri[RI_SLOTS], side = ri[RI_SIDE], size = ri[RI_SIZE];
  const int chains = ri[RI_CHAINS], burn_in = ri[RI_BURN_IN], num_points = ri[RI_NUM_POINTS];
  const bool per_point = ri[RI_PATCH] == 2;
  const int *ii = item_i + (long long)item * ITEM_INTS;
  if (!ii[0]) {  // inactive object slot: nothing to draw
    if (threadIdx.x == 0) points[item] = 0;
    return;
  }
  for (int i = threadIdx.x; i < ITEM_FLOATS; i += blockDim.x) params[i] = item_f[(long long)item * ITEM_FLOATS + i];
  u32 *hist = use_shared ? shared_hist : hist_global + (long long)item * side * side;
  for (int i = threadIdx.x; i < side * side; i += blockDim.x) hist[i] = 0u;
  __syncthreads();

  const int nmaps = ii[3], mask = ii[5], flips = ii[6];
  const long long index = indices[item / slots];
  const u32 tag = make_tag(STREAM_CHAOS, (u32)(item % slots), (u32)threadIdx.x);
  const int steps = burn_in + (num_points + chains - 1) / chains;
  // Point p = (step - burn_in) * chains + chain is recorded while p < num_points.
  const int recorded = (int)threadIdx.x < num_points ? (num_points - (int)threadIdx.x + chains - 1) / chains : 0;

  // Pass 1: bounding box of recorded points; any non-finite point makes the item degenerate.
  float xmin = F_INF, xmax = -F_INF, ymin = F_INF, ymax = -F_INF;
  bool alive = true;
  run_chain(params, nmaps, seed, epoch, index, tag, steps, per_point, [&](int s, float x, float y, u32) {
    alive = alive && finite(x) && finite(y);
    if (s >= burn_in && s - burn_in < recorded && alive) {
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
    points[item] = all_alive ? num_points : 0;
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

  // Pass 2: the same chain again, binned. Lanes that land on the same pixel add once, together.
  if (all_alive) {
    const float lo_x = win[0], lo_y = win[1], px_x = win[2], px_y = win[3], edge = (float)side;
    const unsigned lane = threadIdx.x % 32;
    run_chain(params, nmaps, seed, epoch, index, tag, steps, per_point, [&](int s, float x, float y, u32 kw) {
      int pixel = -1;
      if (s >= burn_in && s - burn_in < recorded) {
        float vr = (x - lo_x) * px_x;
        float vc = (y - lo_y) * px_y;
        if (vr >= 0.0f && vr < edge && vc >= 0.0f && vc < edge) pixel = (int)vr * side + (int)vc;
      }
      if (per_point) {
        if (pixel >= 0) atomicOr(&hist[pixel], 1u + (u32)to_int(kw, 511));
      } else {
        unsigned active = __activemask();
        int key = pixel >= 0 ? pixel : -1 - (int)lane;  // misses never merge
        unsigned same = __match_any_sync(active, key);
        if (pixel >= 0 && lane == (unsigned)(__ffs(same) - 1)) atomicAdd(&hist[pixel], (u32)__popc(same));
      }
    });
  }
  __syncthreads();

  // Peak of the stamped counts (graded density = stamped / peak).
  float peak = 0.0f;
  const bool binary = ri[RI_BINARY] || per_point;
  if (!binary) {
    u32 local = 0;
    for_each_stamped(hist, side, mask, false, [&](int, int, u32 v) { local = v > local ? v : local; });
    peak = block_reduce((float)local, scratch, true);
  }

  // Colour each source pixel and write it where the flips send it. Single-object items draw over the
  // background already in the canvas.
  const bool multi = ri[RI_MULTI_OBJECT];
  const long long sample = item / slots;
  for_each_stamped(hist, side, mask, per_point, [&](int sr, int sc, u32 v) {
    const float g = binary ? (v > 0 ? 1.0f : 0.0f) : (peak > 0.0f ? (float)v / peak : 0.0f);
    if (!multi && g <= 0.0f) return;
    // Inverse of reference.flip: transpose (bit 1) is its own inverse, so are the reversals (bits 2, 4).
    const int rt = (flips & 1) ? sc : sr, ct = (flips & 1) ? sr : sc;
    const int r = (flips & 2) ? side - 1 - rt : rt;
    const int c = (flips & 4) ? side - 1 - ct : ct;
    unsigned char rgb[3] = {0, 0, 0};
    if (g > 0.0f) {
      if (ri[RI_COLOR]) {
        int h8 = ((int)floorf(g * 255.0f + params[IF_HUE])) & 255;
        hsv_to_rgb(h8, ii[7], ii[8], rgb);
      } else {
        unsigned char grey = (unsigned char)(g * (float)ri[RI_GREY]);
        rgb[0] = rgb[1] = rgb[2] = grey;
      }
    }
    const long long at = multi ? ((long long)item * side * side + r * side + c) * 3
                               : ((sample * size + r) * size + c) * 3;
    out[at] = rgb[0];
    out[at + 1] = rgb[1];
    out[at + 2] = rgb[2];
  });
}
