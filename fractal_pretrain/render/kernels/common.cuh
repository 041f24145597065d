// Shared device code of the fractal kernels: Philox4x32-10, uniform draws, recipe constants, colour.
// Mirrors fractal_pretrain/rng.py and render/params.py, render/reference.py operation for operation.
// Compile with -fmad=false: float32 results must match NumPy's separately rounded multiply and add.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;

// Constants shared with Python (RNG streams STREAM_*, draw numbers DRAW_*, recipe choices JITTER_* and
// PATCH_*, the recipe-constant layouts RI_* / RF_*, the plan layouts SAMPLE_FLOATS, ITEM_INTS, ITEM_FLOATS,
// IF_*, MAX_MAPS, ROW, the Mandelbulb layouts MB_*) are not written here: render/kernel_constants.py
// generates them and every build passes them as -D options (NVRTC, nvcc, the emulator, fast_cpu).
#ifndef FRACTAL_CONSTANTS
#error "compile with the -D options of fractal_pretrain/render/kernel_constants.py define_options()"
#endif

// Finite test that needs no math header (NVRTC) and survives any flags: false for inf and NaN.
__host__ __device__ inline bool finite(float x) { return fabsf(x) <= 3.402823466e+38f; }

struct Words {
  u32 w[4];
};

__host__ __device__ inline void mulhilo(u32 m, u32 x, u32 &hi, u32 &lo) {
  u64 p = (u64)m * (u64)x;
  hi = (u32)(p >> 32);
  lo = (u32)p;
}

__host__ __device__ inline Words philox4x32(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
  for (int round = 0; round < 10; ++round) {
    u32 hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Words out;
  out.w[0] = c0; out.w[1] = c1; out.w[2] = c2; out.w[3] = c3;
  return out;
}

__host__ __device__ inline u32 make_tag(u32 stream, u32 slot, u32 lane) {
  return (stream << 24) | (slot << 16) | lane;
}

// Four words for (seed, epoch, index, stream/slot/lane, draw): rng.draw_words.
__host__ __device__ inline Words draw_words(u32 seed, u32 epoch, long long index, u32 tag, u32 draw) {
  u64 i = (u64)index;
  return philox4x32((u32)i, (u32)(i >> 32), tag, draw, seed, epoch);
}

__host__ __device__ inline float to_uniform(u32 w) { return (float)(w >> 8) * 5.9604644775390625e-08f; }

__host__ __device__ inline float to_range(u32 w, const float *rf, int at) {
  return rf[at] + to_uniform(w) * rf[at + 1];
}

__host__ __device__ inline long long to_int(u32 w, long long n) {
  return (long long)(((u64)w * (u64)n) >> 32);
}

// exp(-x) for 0 <= x <= 3, the same Horner series as params.exp_neg.
__host__ __device__ inline float exp_neg(float x) {
  const float inv_k[11] = {0.0f, (float)(1.0 / 1), (float)(1.0 / 2), (float)(1.0 / 3), (float)(1.0 / 4),
                           (float)(1.0 / 5), (float)(1.0 / 6), (float)(1.0 / 7), (float)(1.0 / 8),
                           (float)(1.0 / 9), (float)(1.0 / 10)};
  float z = -(x * 0.25f);
  float p = 1.0f;
  for (int k = 10; k >= 1; --k) p = 1.0f + (z * p) * inv_k[k];
  p = p * p;
  return p * p;
}

// sin and cos of |x| <= 0.5, the same Horner series in x^2 as params.sin_cos.
__host__ __device__ inline void sin_cos(float x, float *s_out, float *c_out) {
  const float inv_sin[7] = {0.0f, (float)(1.0 / 6), (float)(1.0 / 20), (float)(1.0 / 42), (float)(1.0 / 72),
                            (float)(1.0 / 110), (float)(1.0 / 156)};
  const float inv_cos[7] = {0.0f, (float)(1.0 / 2), (float)(1.0 / 12), (float)(1.0 / 30), (float)(1.0 / 56),
                            (float)(1.0 / 90), (float)(1.0 / 132)};
  const float x2 = x * x;
  float s = 1.0f, c = 1.0f;
  for (int k = 6; k >= 1; --k) {
    s = 1.0f - (x2 * s) * inv_sin[k];
    c = 1.0f - (x2 * c) * inv_cos[k];
  }
  *s_out = x * s;
  *c_out = c;
}

__host__ __device__ inline unsigned char round_u8(float v) {
  float r = rintf(v);
  r = r < 0.0f ? 0.0f : (r > 255.0f ? 255.0f : r);
  return (unsigned char)r;
}

// OpenCV's 8-bit HSV -> RGB (reference.hsv_to_rgb). The sector picks (r, g, b) among v, p, q, t with a
// switch, not a table lookup: an indexed local array would live in local memory, per pixel.
__host__ __device__ inline void hsv_to_rgb(int h8, int s8, int v8, unsigned char *rgb) {
  float h = (float)h8 * (float)(6.0 / 180.0);
  if (h >= 6.0f) h = h - 6.0f;
  float s = (float)s8 * (float)(1.0 / 255.0);
  float v = (float)v8 * (float)(1.0 / 255.0);
  int sector = (int)floorf(h);
  float f = h - (float)sector;
  float p = v * (1.0f - s);
  float q = v * (1.0f - s * f);
  float t = v * (1.0f - s * (1.0f - f));
  float r, g, b;
  switch (sector) {
    case 0: r = v; g = t; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = t; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
  rgb[0] = round_u8(r * 255.0f);
  rgb[1] = round_u8(g * 255.0f);
  rgb[2] = round_u8(b * 255.0f);
}

#ifdef __CUDACC__
// Min or max over the block, any blockDim <= 1024 (a shared-memory tree; called by every thread).
__device__ inline float block_reduce(float v, float *red, bool is_max) {
  __syncthreads();
  red[threadIdx.x] = v;
  __syncthreads();
  const int t = threadIdx.x, threads = blockDim.x;
  for (int stride = 512; stride > 0; stride /= 2) {
    if (t < stride && t + stride < threads) {
      float o = red[t + stride];
      red[t] = is_max ? fmaxf(red[t], o) : fminf(red[t], o);
    }
    __syncthreads();
  }
  float r = red[0];
  __syncthreads();
  return r;
}
#endif
