// Shared device code of the fractal kernels: Philox4x32-10, uniform draws, recipe constants, colour.
// Mirrors fractal_pretrain/rng.py and render/params.py, render/reference.py operation for operation.
// Compile with -fmad=false: float32 results must match NumPy's separately rounded multiply and add.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;

// Stream ids: the top byte of the counter's tag word (rng.py).
#define STREAM_SAMPLE 1u
#define STREAM_ITEM 2u
#define STREAM_CHAOS 3u
#define STREAM_PLASMA 4u

// Draw numbers (params.py).
#define DRAW_SAMPLE_MAIN 0u
#define DRAW_SAMPLE_CORNERS 1u
#define DRAW_SAMPLE_BG_HS 2u
#define DRAW_SAMPLE_BG_V 3u
#define DRAW_ITEM_SYSTEM 0u
#define DRAW_ITEM_JITTER 1u
#define DRAW_ITEM_WINDOW 20u
#define DRAW_ITEM_LOOK 21u
#define DRAW_ITEM_PLACE 22u

#define MAX_MAPS 8
#define ROW 6  // a map row [a b e c d f]

// Integer recipe constants (cupy_renderer.py RECIPE_INTS gives the same order).
#define RI_NUM_CLASSES 0
#define RI_SYSTEMS_PER_CLASS 1
#define RI_JITTER 2  // 0 none, 1 basic, 2 fractaldb
#define RI_JITTER_TRIES 3
#define RI_PATCH 4  // 0 none, 1 image, 2 point
#define RI_FLIP_BITS 5
#define RI_BINARY 6
#define RI_COLOR 7
#define RI_GREY 8
#define RI_BACKGROUND 9
#define RI_MULTI_OBJECT 10
#define RI_SOURCE_ANY 11
#define RI_MULTI_LABEL 12
#define RI_OBJECTS_LO 13
#define RI_OBJECTS_HI 14
#define RI_NUM_POINTS 15
#define RI_CHAINS 16
#define RI_BURN_IN 17
#define RI_SIZE 18
#define RI_SIDE 19
#define RI_SLOTS 20
#define RI_COUNT 21

// Float recipe constants as (low, width) pairs, rounded to float32 once on the host.
#define RF_JITTER 0
#define RF_TRANSLATE 2
#define RF_SCALE 4
#define RF_SAT 6
#define RF_VAL 8
#define RF_BLUR_P 10
#define RF_BLUR_SIGMA 11
#define RF_OBJECT_SCALE 13
#define RF_PLASMA_HUE_GAIN 15
#define RF_PLASMA_HUE_OFFSET 17
#define RF_PLASMA_SAT_GAIN 19
#define RF_PLASMA_SAT_OFFSET 21
#define RF_PLASMA_VAL_GAIN 23
#define RF_PLASMA_VAL_OFFSET 25
#define RF_PLASMA_DECAY 27
#define RF_HUE_SHIFT 29
#define RF_COUNT 31

// Finite test that needs no math header (NVRTC) and survives any flags: false for inf and NaN.
__host__ __device__ inline bool finite(float x) { return fabsf(x) <= 3.402823466e+38f; }

// Plan layouts (cupy_renderer.py: SAMPLE_FLOATS, ITEM_INTS, ITEM_FLOATS).
// Per sample floats: blur flag, k0, k1, sigma; plasma decay, 4 corners, 6 colour gains x 255.
#define SAMPLE_FLOATS 15
// Per item ints: active, system, class, num_maps, jitter, mask, flips, sat8, val8, side, top, left.
#define ITEM_INTS 12
// Per item floats: maps (8 x 6), cum (8), start (2), shift (2), scale (2), hue shift.
#define ITEM_FLOATS (MAX_MAPS * ROW + MAX_MAPS + 7)
#define IF_CUM (MAX_MAPS * ROW)
#define IF_START (IF_CUM + MAX_MAPS)
#define IF_SHIFT (IF_START + 2)
#define IF_SCALE (IF_SHIFT + 2)
#define IF_HUE (IF_SCALE + 2)

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
