// Image-level kernels (mirror reference.background, paste_objects, blur):
//   plasma_background(_global): one block per sample, diamond-square (in shared memory up to 256 px, else
//   in a global grid), coloured into the canvas;
//   paste_objects: one thread per canvas pixel (grid: pixel blocks x samples), objects resized bilinearly
//   and pasted in slot order;
//   finish: one thread per band of rows of a column (grid: runs x samples), optional 3x3 Gaussian blur as a
//   sliding horizontal-then-vertical pass, then layout and dtype.
#include "common.cuh"

#define F_INF __int_as_float(0x7f800000)

// Points (r, c) of the plasma grid whose coordinates are multiples of 2^shift, row-major in v.
struct Lattice {
  float *v;
  int stride, shift;
  __device__ float &at(int r, int c) const { return v[(r >> shift) * stride + (c >> shift)]; }
};

__device__ inline float plasma_noise(u32 seed, u32 epoch, long long index, int n, int r, int c) {
  const u32 tag = make_tag(STREAM_PLASMA, 0, 0);
  return to_uniform(draw_words(seed, epoch, index, tag, (u32)(r * n + c)).w[0]) * 2.0f - 1.0f;
}

// Square-step value of (r, c): mean of the in-grid neighbours up, left, right, down (in that order) + noise.
template <typename Get>
__device__ inline float square_point(int r, int c, int half, int last, float noise, float amp, Get get) {
  float sum = 0.0f, count = 0.0f;
  const int dr[4] = {-half, 0, 0, half}, dc[4] = {0, -half, half, 0};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int rr = r + dr[k], cc = c + dc[k];
    if (rr < 0 || rr > last || cc < 0 || cc > last) continue;
    sum = sum + get(rr, cc);
    count = count + 1.0f;
  }
  // Dividing by 4 and multiplying by 0.25 round the same exact quotient: interior points skip the division.
  return (count == 4.0f ? sum * 0.25f : sum / count) + noise * amp;
}

// Diamond-square levels from step = n - 1 while step > stop, in g (reference.plasma); returns the
// amplitude of the next level.
__device__ inline float plasma_levels(const Lattice &g, int n, int stop, const float *sf, u32 seed, u32 epoch,
                                      long long index) {
  const int last = n - 1;
  if (threadIdx.x == 0) {
    g.at(0, 0) = sf[5];
    g.at(0, last) = sf[6];
    g.at(last, 0) = sf[7];
    g.at(last, last) = sf[8];
  }
  __syncthreads();
  float amp = 0.5f;
  for (int step = last; step > stop; step /= 2) {
    const int half = step / 2, cells = last / step;
    // Diamond step: square centres.
    for (int i = threadIdx.x; i < cells * cells; i += blockDim.x) {
      const int r = half + (i / cells) * step, c = half + (i % cells) * step;
      const float tl = g.at(r - half, c - half), tr = g.at(r - half, c + half);
      const float bl = g.at(r + half, c - half), br = g.at(r + half, c + half);
      g.at(r, c) = ((tl + tr) + (bl + br)) * 0.25f + plasma_noise(seed, epoch, index, n, r, c) * amp;
    }
    __syncthreads();
    // Square step: edge midpoints of both sub-lattices.
    const int rows0 = last / step + 1, cols0 = cells;  // r0 = 0: rows 0, step, ..; cols half, ..
    const int total = rows0 * cols0 + cells * (last / step + 1);
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      int r, c;
      if (i < rows0 * cols0) {
        r = (i / cols0) * step;
        c = half + (i % cols0) * step;
      } else {
        const int j = i - rows0 * cols0, cols1 = last / step + 1;
        r = half + (j / cols1) * step;
        c = (j % cols1) * step;
      }
      g.at(r, c) = square_point(r, c, half, last, plasma_noise(seed, epoch, index, n, r, c), amp,
                                [&](int rr, int cc) { return g.at(rr, cc); });
    }
    __syncthreads();
    amp = amp * sf[4];
  }
  return amp;
}

// Normalise the crop's values to [0, 1] and colour them into the canvas (reference.background); value(r, c)
// is called twice per pixel (min/max, then colour) and must return the same float both times.
template <typename Value>
__device__ inline void colour_plasma(int b, int size, const float *sf, unsigned char *canvas, float *red,
                                     Value value) {
  const int pixels = size * size, step_r = blockDim.x / size, step_c = blockDim.x % size;
  float lo = F_INF, hi = -F_INF;
  for (int q = threadIdx.x, r = q / size, c = q % size; q < pixels; q += blockDim.x) {
    const float v = value(r, c);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    r += step_r, c += step_c;  // (r, c) of q + blockDim.x without a division
    if (c >= size) r += 1, c -= size;
  }
  lo = block_reduce(lo, red, false);
  hi = block_reduce(hi, red, true);
  unsigned char *img = canvas + (long long)b * pixels * 3;
  for (int q = threadIdx.x, r = q / size, c = q % size; q < pixels; q += blockDim.x) {
    const float v = value(r, c);
    const float x = hi > lo ? (v - lo) / (hi - lo) : 0.0f;
    const int h8 = ((int)floorf(x * sf[9] + sf[10])) & 255;
    const int s8 = (int)(x * sf[11] + sf[12]);
    const int v8 = (int)(x * sf[13] + sf[14]);
    hsv_to_rgb(h8, s8, v8, img + q * 3);
    r += step_r, c += step_c;
    if (c >= size) r += 1, c -= size;
  }
}

// Grids up to 257 x 257 (images up to 256 px). The even-coordinate lattice, which every level but the
// last builds and reads, lives in shared memory (dynamic: m x m floats, m = (n + 1) / 2). The last level's
// diamond centres (odd, odd) go to `grids` (k x k floats per sample, k = (n - 1) / 2); its square points
// are computed where they are coloured, never stored: no grid in global memory but the diamonds.
extern "C" __global__ void plasma_background(const long long *indices, u32 seed, u32 epoch, int size, int n,
                                             const float *sample_f, float *grids, unsigned char *canvas) {
  extern __shared__ float even[];
  __shared__ float red[1024];
  const int b = blockIdx.x, last = n - 1, m = (n + 1) / 2, k = last / 2;
  const long long index = indices[b];
  const float *sf = sample_f + (long long)b * SAMPLE_FLOATS;
  const Lattice coarse = {even, m, 1};
  const float amp = plasma_levels(coarse, n, 2, sf, seed, epoch, index);
  // Last level (step 2, half 1), diamond step: the odd-odd centres.
  float *diamonds = grids + (long long)b * k * k;
  for (int i = threadIdx.x; i < k * k; i += blockDim.x) {
    const int r = 1 + (i / k) * 2, c = 1 + (i % k) * 2;
    const float tl = coarse.at(r - 1, c - 1), tr = coarse.at(r - 1, c + 1);
    const float bl = coarse.at(r + 1, c - 1), br = coarse.at(r + 1, c + 1);
    diamonds[i] = ((tl + tr) + (bl + br)) * 0.25f + plasma_noise(seed, epoch, index, n, r, c) * amp;
  }
  __syncthreads();
  const Lattice odd = {diamonds, k, 1};  // odd r, c: r >> 1 == (r - 1) / 2
  auto point = [&](int r, int c) { return (r & 1) ? odd.at(r, c) : coarse.at(r, c); };  // r, c same parity
  colour_plasma(b, size, sf, canvas, red, [&](int r, int c) {
    if (((r ^ c) & 1) == 0) return point(r, c);
    return square_point(r, c, 1, last, plasma_noise(seed, epoch, index, n, r, c), amp, point);
  });
}

// Any grid size: the whole n x n grid in `grids` (global memory), one block per sample.
extern "C" __global__ void plasma_background_global(const long long *indices, u32 seed, u32 epoch, int size, int n,
                                                    const float *sample_f, float *grids, unsigned char *canvas) {
  __shared__ float red[1024];
  const int b = blockIdx.x;
  const float *sf = sample_f + (long long)b * SAMPLE_FLOATS;
  const Lattice grid = {grids + (long long)b * n * n, n, 0};
  plasma_levels(grid, n, 1, sf, seed, epoch, indices[b]);
  colour_plasma(b, size, sf, canvas, red, [&](int r, int c) { return grid.at(r, c); });
}

extern "C" __global__ void paste_objects(int size, int side, int slots, const int *num_objects, const int *item_i,
                                         const unsigned char *objects, unsigned char *canvas) {
  const int b = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;  // sample, pixel in its canvas
  if (q >= size * size) return;
  const int r = q / size, c = q - r * size;
  unsigned char *dst = canvas + ((long long)b * size * size + q) * 3;
  for (int o = 0; o < num_objects[b]; ++o) {
    const int item = b * slots + o;
    const int *ii = item_i + (long long)item * ITEM_INTS;
    const int obj_side = ii[9], top = ii[10], left = ii[11];
    const int lr = r - top, lc = c - left;
    if (lr < 0 || lr >= obj_side || lc < 0 || lc >= obj_side) continue;
    const float ratio = (float)side / (float)obj_side;
    float pr = fmaxf(((float)lr + 0.5f) * ratio - 0.5f, 0.0f);
    float pc = fmaxf(((float)lc + 0.5f) * ratio - 0.5f, 0.0f);
    int ra = min((int)floorf(pr), side - 1), ca = min((int)floorf(pc), side - 1);
    int rb = min(ra + 1, side - 1), cb = min(ca + 1, side - 1);
    float fr = pr - (float)ra, fc = pc - (float)ca;
    const unsigned char *obj = objects + (long long)item * side * side * 3;
    unsigned char rgb[3];
    bool any = false;
    for (int ch = 0; ch < 3; ++ch) {
      float p00 = obj[(ra * side + ca) * 3 + ch], p01 = obj[(ra * side + cb) * 3 + ch];
      float p10 = obj[(rb * side + ca) * 3 + ch], p11 = obj[(rb * side + cb) * 3 + ch];
      float top_row = p00 * (1.0f - fc) + p01 * fc;
      float bottom_row = p10 * (1.0f - fc) + p11 * fc;
      rgb[ch] = round_u8(top_row * (1.0f - fr) + bottom_row * fr);
      any = any || rgb[ch] > 0;
    }
    if (any) {
      dst[0] = rgb[0];
      dst[1] = rgb[1];
      dst[2] = rgb[2];
    }
  }
}

__device__ inline int reflect101(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Horizontal pass of the blur for row r at column c, per channel (reference.blur: `rows`).
__device__ inline void blur_row(const unsigned char *img, int size, int r, int c, float k0, float k1, float *sums) {
  const unsigned char *row = img + r * size * 3;
  const int left = reflect101(c - 1, size) * 3, mid = c * 3, right = reflect101(c + 1, size) * 3;
#pragma unroll
  for (int ch = 0; ch < 3; ++ch)
    sums[ch] = (k1 * (float)row[left + ch] + k0 * (float)row[mid + ch]) + k1 * (float)row[right + ch];
}

// float32 -> bfloat16 bits, rounded to nearest even (torch's .to(torch.bfloat16)); inputs are finite.
__device__ inline unsigned short bfloat16_bits(float f) {
  const u32 bits = __float_as_uint(f);
  return (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// out_kind: 0 uint8, 1 float32 normalised ((x / 255 - mean) / std), 2 the same rounded to bfloat16 (what
// a bf16 autocast would do to float32 input, without writing and reading the float32 tensor).
// channels_last: NHWC, else NCHW.
// Grid (runs, samples): a thread walks `band` rows down one column of an image (run = band index x size +
// column), so the blur's horizontal sums of a row are computed once and used by the three output rows
// they touch (separable, in the reference's operation order: the same floats).
extern "C" __global__ void finish(int size, int band, const float *sample_f, const unsigned char *canvas, int out_kind,
                                  int channels_last, const float *mean, const float *std, void *out) {
  const int b = blockIdx.y, run = blockIdx.x * blockDim.x + threadIdx.x;
  const int bands = (size + band - 1) / band;
  if (run >= size * bands) return;
  const int c = run % size, r0 = run / size * band, r1 = min(r0 + band, size);
  const int pixels = size * size;
  const float *sf = sample_f + (long long)b * SAMPLE_FLOATS;
  const unsigned char *img = canvas + (long long)b * pixels * 3;
  const bool blur = sf[0] > 0.0f;
  const float k0 = sf[1], k1 = sf[2];
  float above[3], here[3], below[3];  // horizontal sums of rows r - 1, r, r + 1 (reflected at the borders)
  if (blur) {
    blur_row(img, size, reflect101(r0 - 1, size), c, k0, k1, above);
    blur_row(img, size, r0, c, k0, k1, here);
  }
  for (int r = r0; r < r1; ++r) {
    const int q = r * size + c;
    unsigned char v[3];
    if (blur) {
      blur_row(img, size, reflect101(r + 1, size), c, k0, k1, below);
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) {
        v[ch] = round_u8((k1 * above[ch] + k0 * here[ch]) + k1 * below[ch]);
        above[ch] = here[ch];
        here[ch] = below[ch];
      }
    } else {
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) v[ch] = img[q * 3 + ch];
    }
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) {
      const long long at = channels_last ? ((long long)b * pixels + q) * 3 + ch : ((long long)b * 3 + ch) * pixels + q;
      if (out_kind == 0) {
        ((unsigned char *)out)[at] = v[ch];
        continue;
      }
      const float x = ((float)v[ch] * (float)(1.0 / 255.0) - mean[ch]) / std[ch];
      if (out_kind == 1) ((float *)out)[at] = x;
      else ((unsigned short *)out)[at] = bfloat16_bits(x);
    }
  }
}
