// Mandelbulb-variation ray marcher (mirrors fractal_pretrain/mandelbulb/reference.py operation for operation):
//   march_sprites: one thread per sprite pixel (grid: pixel blocks x objects); supersample^2 primary rays,
//   each sphere-traced through the distance estimator, shaded, shadow-tested, clamped and box-filtered
//   into a premultiplied RGB + alpha uint8 sprite;
//   paste_sprites: one thread per canvas pixel (grid: pixel blocks x samples), sprites blended in slot order;
//   paste_bank: the same from a view bank (march_sprites output kept resident), each view resized bilinearly.
// Only float32 +, -, *, /, sqrt, comparisons and bit selection (compile with --fmad=false): no libm call
// whose last bits could differ from NumPy's; powers by square-and-multiply, ln by Cephes' logf (frexpf is
// exact). Cost per ray (benchmarks/PENDING_GPU.md): the march is specialised per power (march_power: the
// power is uniform per block row), marching evaluates the estimator without orbit traps (traps() recomputes
// them once at the primary ray's last point), an iteration's closing |z| is the next one's r, the rule's
// choices are bit masks and an angle no axis uses is skipped; a warp marches a 4 x 8 pixel tile.
// mandelbulb/march_cpu.cpp builds this file for the host (device: cpu).
#include "common.cuh"

// Layouts and flags (MB_ITEM_INTS, MB_ITEM_FLOATS, MB_IF_COLOURS, MB_SHADOW, ...): render/kernel_constants.py.
// Per object ints: active, power, rule, side, top, left, bank row. Floats: camera (position, side, up,
// direction), colours. Powers MB_MIN_POWER..MB_MAX_POWER (recipe.POWER_RANGE). The marcher's constants
// (MB_MAX_ITERATIONS, MB_BAILOUT, MB_PRIMARY_STEPS, MB_LIGHT_X, MB_DIFFUSE, ...): mandelbulb/constants.py.
static_assert(MB_MAX_POWER < (1 << MB_POWER_BITS) && MB_TRAP_EXPONENT < (1 << MB_POWER_BITS),
              "ipow/cpow take MB_POWER_BITS bits of the power");

struct Traps {
  float t0, t1, t2;
};

__device__ inline float log32(float x) {
  int e;
  float m = frexpf(x, &e);
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = (m + m) - 1.0f;
  } else {
    m = m - 1.0f;
  }
  const float fe = (float)e;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = (y * m) * z;
  y = y + -2.12194440e-4f * fe;
  y = y - 0.5f * z;
  float out = m + y;
  out = out + 0.693359375f * fe;
  if (x > 0.0f) return out;
  return x == 0.0f ? -__int_as_float(0x7f800000) : __int_as_float(0x7fc00000);
}

// x^P by square-and-multiply over the bits of P, the product starting at the lowest set bit (1 * x == x:
// the same floats as a product from 1). P is a template argument: only the squarings and products P needs.
template <int P>
__device__ __forceinline__ float ipow(float x) {
  float acc = 1.0f, base = x;
  bool started = false;
#pragma unroll
  for (int k = 0; k < MB_POWER_BITS; ++k) {
    if ((P >> k) & 1) {
      acc = started ? acc * base : base;
      started = true;
    }
    if (P >> (k + 1)) base = base * base;
  }
  return acc;
}

// (cos P t, sin P t) from (cos t, sin t): (c + i s)^P, the product starting at the lowest set bit's square.
// Skipping the product with 1 + 0i changes at most the sign of a zero, which no later operation turns into
// another value (reference.cpow explains why).
template <int P>
__device__ __forceinline__ void cpow(float c, float s, float &rc, float &rs) {
  rc = 1.0f;
  rs = 0.0f;
  bool started = false;
#pragma unroll
  for (int k = 0; k < MB_POWER_BITS; ++k) {
    if ((P >> k) & 1) {
      if (started) {
        const float nc = rc * c - rs * s, ns = rc * s + rs * c;
        rc = nc;
        rs = ns;
      } else {
        rc = c;
        rs = s;
      }
      started = true;
    }
    if (P >> (k + 1)) {
      const float nc = c * c - s * s, ns = c * s + s * c;
      c = nc;
      s = ns;
    }
  }
}

// The rule's choices as bit masks (all ones where chosen), so that picking cos or sin of p theta or p phi
// and the sign is bit arithmetic (a LOP3 each on the device, no predicate): exactly the chosen float or
// its negation (IEEE negation flips the sign bit). An angle no axis uses is not computed (the rule is
// uniform per block row: no divergence).
struct Rule {
  unsigned sin[3], theta[3], neg[3];
  bool uses_theta, uses_phi;
};

__device__ inline Rule rule_masks(int rule) {
  Rule m;
#pragma unroll
  for (int axis = 0; axis < 3; ++axis) {
    m.sin[axis] = 0u - ((rule >> (8 - 3 * axis)) & 1);
    m.theta[axis] = 0u - ((rule >> (7 - 3 * axis)) & 1);
    m.neg[axis] = ((unsigned)(rule >> (6 - 3 * axis)) & 1u) << 31;
  }
  m.uses_theta = (rule & 0x92) != 0;  // the theta bits 7, 4, 1
  m.uses_phi = (~rule & 0x92) != 0;
  return m;
}

// mask ? a : b bitwise. On the device one LOP3 (nvcc splits the C++ form into several); the same bits in
// C++ for the emulator.
__device__ __forceinline__ float pick(unsigned mask, float a, float b) {
  const unsigned x = __float_as_uint(a), y = __float_as_uint(b);
#if defined(__CUDA_ARCH__) && !defined(FRACTAL_EMULATOR)
  unsigned out;
  asm("lop3.b32 %0, %1, %2, %3, 0xCA;" : "=r"(out) : "r"(mask), "r"(x), "r"(y));  // (m & x) | (~m & y)
  return __uint_as_float(out);
#else
  return __uint_as_float((x & mask) | (y & ~mask));
#endif
}

__device__ __forceinline__ float axis_value(const Rule &m, int axis, float cpt, float spt, float cpp, float spp) {
  const float v = pick(m.sin[axis], pick(m.theta[axis], spt, spp), pick(m.theta[axis], cpt, cpp));
  return __uint_as_float(__float_as_uint(v) ^ m.neg[axis]);
}

// One step z <- z^P (by the rule) + c and dr <- r^P P dr + 1 (or r^(P-1) with `textbook`), r = |z| <= 4;
// returns the new |z| (the next iteration's r).
template <int P>
__device__ __forceinline__ float iterate(float &zx, float &zy, float &zz, float &dr, float r, float cx, float cy,
                                         float cz, const Rule &rule, bool textbook) {
  const float rho = sqrtf(zx * zx + zy * zy);
  const float rp = ipow<P>(r);
  const float grow = textbook ? ipow<P - 1>(r) : rp;
  dr = (grow * (float)P) * dr + 1.0f;
  float cpt = 0.0f, spt = 0.0f, cpp = 0.0f, spp = 0.0f;
  if (rule.uses_theta) cpow<P>(zz / r, rho / r, cpt, spt);
  if (rule.uses_phi) {
    const bool flat = !(rho > 0.0f);
    cpow<P>(flat ? 1.0f : zx / rho, flat ? 0.0f : zy / rho, cpp, spp);
  }
  zx = rp * axis_value(rule, 0, cpt, spt, cpp, spp) + cx;
  zy = rp * axis_value(rule, 1, cpt, spt, cpp, spp) + cy;
  zz = rp * axis_value(rule, 2, cpt, spt, cpp, spp) + cz;
  return sqrtf((zx * zx + zy * zy) + zz * zz);
}

// Distance estimate 0.5 ln(r) r / dr from the r at the start of the last iteration (the bailing one, or the
// 100th). Marching needs no orbit traps: they are recomputed once at the primary ray's last point (traps()).
template <int P>
__device__ inline float distance(float cx, float cy, float cz, const Rule &rule, bool textbook) {
  float zx = cx, zy = cy, zz = cz, dr = 1.0f;
  float r = sqrtf((zx * zx + zy * zy) + zz * zz), last = r;
  for (int i = 0; i < MB_MAX_ITERATIONS; ++i) {
    last = r;
    if (r > MB_BAILOUT) break;
    r = iterate<P>(zx, zy, zz, dr, r, cx, cy, cz, rule, textbook);
  }
  return ((0.5f * log32(last)) * last) / dr;
}

// The orbit traps of the same iteration: min |z_z|, min |z|_1 / 1.5 and min |z| after each step (1e20 when
// there is none: MB_TRAP_L1_DIVISOR, MB_TRAP_START). |z| is the next iteration's r; the division by 1.5 and
// the minimum commute (IEEE division is monotonic), so it is done once.
template <int P>
__device__ inline Traps traps(float cx, float cy, float cz, const Rule &rule, bool textbook) {
  float zx = cx, zy = cy, zz = cz, dr = 1.0f;
  float r = sqrtf((zx * zx + zy * zy) + zz * zz);
  float t0 = MB_TRAP_START, l1 = __int_as_float(0x7f800000), t2 = MB_TRAP_START;
  for (int i = 0; i < MB_MAX_ITERATIONS; ++i) {
    if (r > MB_BAILOUT) break;
    r = iterate<P>(zx, zy, zz, dr, r, cx, cy, cz, rule, textbook);
    const float az = fabsf(zz), sum = (fabsf(zx) + fabsf(zy)) + az;
    t0 = az < t0 ? az : t0;
    l1 = sum < l1 ? sum : l1;
    t2 = r < t2 ? r : t2;
  }
  const float t1 = l1 / MB_TRAP_L1_DIVISOR;
  return {t0, t1 < MB_TRAP_START ? t1 : MB_TRAP_START, t2};
}

// Sphere tracing: the distance L where DE <= threshold, or after `steps` steps (or once L >= limit); `probe`
// is the L of the last DE evaluation (L itself unless the step limit or the early exit stopped the march).
template <int P>
__device__ inline float march(const float *o, const float *d, const Rule &rule, bool textbook, int steps,
                              float threshold, float limit, bool early_exit, float &probe) {
  float L = 0.0f;
  probe = 0.0f;
  for (int step = 0; step < steps; ++step) {
    probe = L;
    const float de = distance<P>(o[0] + L * d[0], o[1] + L * d[1], o[2] + L * d[2], rule, textbook);
    if (!(de > threshold)) return L;
    L = L + de;
    if (early_exit && L >= limit) return L;
  }
  return L;
}

__device__ inline void normalise(float *v) {
  const float n = sqrtf((v[0] * v[0] + v[1] * v[1]) + v[2] * v[2]);
  v[0] = v[0] / n;
  v[1] = v[1] / n;
  v[2] = v[2] / n;
}

__device__ inline float clamp01(float x) { return x > 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

// Colour of a hit (reference.shade), clamped to [0, 1].
template <int P>
__device__ inline void shade(const float *hit, const float *colours, const Traps &t, const Rule &rule,
                             int flags, float *col) {
  const bool textbook = flags & MB_TEXTBOOK_DERIVATIVE;
  const float r = sqrtf((hit[0] * hit[0] + hit[1] * hit[1]) + hit[2] * hit[2]);
  float normal[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    float plus[3] = {hit[0], hit[1], hit[2]}, minus[3] = {hit[0], hit[1], hit[2]};
    plus[a] = hit[a] + MB_NORMAL_EPS;
    minus[a] = hit[a] - MB_NORMAL_EPS;
    normal[a] = distance<P>(plus[0], plus[1], plus[2], rule, textbook) -
                distance<P>(minus[0], minus[1], minus[2], rule, textbook);
  }
  normalise(normal);
  float light[3] = {MB_LIGHT_X - hit[0], MB_LIGHT_Y - hit[1], MB_LIGHT_Z - hit[2]};
  normalise(light);
  const float sign = (flags & MB_NEGATED_NORMAL) ? -1.0f : 1.0f;  // -x and -1 * x are the same float
  const float d = (light[0] * (sign * normal[0]) + light[1] * (sign * normal[1])) + light[2] * (sign * normal[2]);
  const float diffuse = MB_DIFFUSE * (d > 0.0f ? d : 0.0f);
  const float w0 = clamp01(t.t0), w1 = clamp01(ipow<MB_TRAP_EXPONENT>(t.t1)),
              w2 = clamp01(ipow<MB_TRAP_EXPONENT>(t.t2));
  bool lit = false;
  if (flags & MB_SHADOW) {
    const float start[3] = {hit[0] + normal[0] / MB_SHADOW_OFFSET_DIVISOR,
                            hit[1] + normal[1] / MB_SHADOW_OFFSET_DIVISOR,
                            hit[2] + normal[2] / MB_SHADOW_OFFSET_DIVISOR};
    float probe;
    lit = march<P>(start, light, rule, textbook, MB_SHADOW_STEPS, MB_SHADOW_THRESHOLD, MB_SHADOW_LIMIT,
                   flags & MB_EARLY_EXIT, probe) >= MB_SHADOW_LIMIT;
  }
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    float v = (colours[c] * w0 + colours[3 + c] * w1) + colours[6 + c] * w2;
    v = (v * (diffuse + MB_AMBIENT)) * (r * r);
    if (lit) v = v + MB_SHADOW_LIGHT;
    col[c] = clamp01(v);
  }
}

__device__ inline float screen(int coord, int n) {
  const float nf = (float)n;
  return ((((float)coord + 0.5f) * 2.0f - nf) / nf) / 2.0f;
}

// One sprite pixel of an object of power P: supersample^2 rays, shaded, box-filtered.
template <int P>
__device__ void march_pixel(int i, int j, int side, int ss, int rule_bits, int flags, const float *cam,
                            unsigned char *out) {
  const int n = side * ss;
  const Rule rule = rule_masks(rule_bits);
  const bool textbook = flags & MB_TEXTBOOK_DERIVATIVE;
  float acc[3] = {0.0f, 0.0f, 0.0f};
  int hits = 0;
  for (int a = 0; a < ss; ++a) {
    for (int b = 0; b < ss; ++b) {
      const float px = screen(j * ss + b, n), py = screen((n - 1) - (i * ss + a), n);
      float ray[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) ray[k] = (cam[3 + k] * px + cam[6 + k] * py) + cam[9 + k];
      normalise(ray);
      float probe;
      const float L = march<P>(cam, ray, rule, textbook, MB_PRIMARY_STEPS, MB_PRIMARY_THRESHOLD, MB_PRIMARY_LIMIT,
                               flags & MB_EARLY_EXIT, probe);
      float col[3] = {0.0f, 0.0f, 0.0f};
      if (L < MB_PRIMARY_LIMIT) {
        const Traps t = traps<P>(cam[0] + probe * ray[0], cam[1] + probe * ray[1], cam[2] + probe * ray[2], rule,
                                 textbook);
        const float hit[3] = {cam[0] + ray[0] * L, cam[1] + ray[1] * L, cam[2] + ray[2] * L};
        shade<P>(hit, cam + MB_IF_COLOURS, t, rule, flags, col);
        hits += 1;
      }
#pragma unroll
      for (int c = 0; c < 3; ++c) acc[c] = acc[c] + col[c];
    }
  }
  const float count = (float)(ss * ss);
#pragma unroll
  for (int c = 0; c < 3; ++c) out[c] = round_u8((acc[c] / count) * 255.0f);
  out[3] = (unsigned char)((hits * 510 + ss * ss) / (2 * ss * ss));
}

// The power is uniform per object (a block row): one specialised march per power of the recipes' range.
template <int P>
__device__ void march_power(int p, int i, int j, int side, int ss, int rule, int flags, const float *cam,
                            unsigned char *out) {
  if (p == P) {
    march_pixel<P>(i, j, side, ss, rule, flags, cam, out);
  } else if constexpr (P < MB_MAX_POWER) {
    march_power<P + 1>(p, i, j, side, ss, rule, flags, cam, out);
  } else {
    out[0] = out[1] = out[2] = out[3] = 0;  // outside the validated range (recipe.POWER_RANGE): never planned
  }
}

extern "C" __global__ void march_sprites(int max_side, int supersample, int flags, const int *item_i,
                                         const float *item_f, unsigned char *sprites) {
  // A warp's 32 threads take a tile of MB_TILE_ROWS x MB_TILE_COLS pixels (4 x 8): neighbouring rays take
  // similar step counts, less divergence than 32 pixels of one row. Tiles in row-major order; threads past
  // the sprite's edge (max_side not a multiple of the tile) write nothing.
  const int item = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;
  const int tiles_per_row = (max_side + MB_TILE_COLS - 1) / MB_TILE_COLS;
  const int tile = q / (MB_TILE_ROWS * MB_TILE_COLS), lane = q % (MB_TILE_ROWS * MB_TILE_COLS);
  const int i = (tile / tiles_per_row) * MB_TILE_ROWS + lane / MB_TILE_COLS;
  const int j = (tile % tiles_per_row) * MB_TILE_COLS + lane % MB_TILE_COLS;
  if (i >= max_side || j >= max_side) return;
  const int *ii = item_i + (long long)item * MB_ITEM_INTS;
  const float *cam = item_f + (long long)item * MB_ITEM_FLOATS;
  unsigned char *out = sprites + ((long long)item * max_side * max_side + (long long)i * max_side + j) * 4;
  const int side = ii[3];
  if (!ii[0] || i >= side || j >= side) {
    out[0] = out[1] = out[2] = out[3] = 0;
    return;
  }
  march_power<MB_MIN_POWER>(ii[1], i, j, side, supersample, ii[2], flags, cam, out);
}

// Blends a premultiplied RGBA texel over the canvas pixel: rint(rgb + canvas (255 - alpha) / 255).
__device__ inline void blend(const float *rgba, unsigned char *dst) {
  const float keep = (255.0f - rgba[3]) * (float)(1.0 / 255.0);
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) {
    const float v = rintf(rgba[ch] + (float)dst[ch] * keep);
    dst[ch] = (unsigned char)(v < 255.0f ? v : 255.0f);
  }
}

// Half-pixel-centre bilinear taps (reference.bilinear_taps of the IFS renderer).
__device__ inline void tap(int dst, float ratio, int src, int &lower, int &upper, float &frac) {
  float pos = ((float)dst + 0.5f) * ratio - 0.5f;
  pos = pos > 0.0f ? pos : 0.0f;
  lower = min((int)floorf(pos), src - 1);
  upper = min(lower + 1, src - 1);
  frac = pos - (float)lower;
}

extern "C" __global__ void paste_sprites(int size, int slots, int max_side, const int *num_objects,
                                         const int *item_i, const unsigned char *sprites, unsigned char *canvas) {
  const int b = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= size * size) return;
  const int r = q / size, c = q - r * size;
  unsigned char *dst = canvas + ((long long)b * size * size + q) * 3;
  for (int o = 0; o < num_objects[b]; ++o) {
    const int item = b * slots + o;
    const int *ii = item_i + (long long)item * MB_ITEM_INTS;
    const int sr = r - ii[4], sc = c - ii[5];
    if (sr < 0 || sr >= ii[3] || sc < 0 || sc >= ii[3]) continue;
    const unsigned char *s = sprites + (((long long)item * max_side + sr) * max_side + sc) * 4;
    const float rgba[4] = {(float)s[0], (float)s[1], (float)s[2], (float)s[3]};
    blend(rgba, dst);
  }
}

extern "C" __global__ void paste_bank(int size, int slots, int bank_side, const int *num_objects, const int *item_i,
                                      const unsigned char *bank, unsigned char *canvas) {
  const int b = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= size * size) return;
  const int r = q / size, c = q - r * size;
  unsigned char *dst = canvas + ((long long)b * size * size + q) * 3;
  for (int o = 0; o < num_objects[b]; ++o) {
    const int *ii = item_i + (long long)(b * slots + o) * MB_ITEM_INTS;
    const int side = ii[3], sr = r - ii[4], sc = c - ii[5];
    if (sr < 0 || sr >= side || sc < 0 || sc >= side) continue;
    const float ratio = (float)bank_side / (float)side;
    int ra, rb, ca, cb;
    float fr, fc;
    tap(sr, ratio, bank_side, ra, rb, fr);
    tap(sc, ratio, bank_side, ca, cb, fc);
    const unsigned char *view = bank + (long long)ii[6] * bank_side * bank_side * 4;
    float rgba[4];
#pragma unroll
    for (int ch = 0; ch < 4; ++ch) {
      const float top = (float)view[(ra * bank_side + ca) * 4 + ch] * (1.0f - fc) +
                        (float)view[(ra * bank_side + cb) * 4 + ch] * fc;
      const float bottom = (float)view[(rb * bank_side + ca) * 4 + ch] * (1.0f - fc) +
                           (float)view[(rb * bank_side + cb) * 4 + ch] * fc;
      const float v = rintf(top * (1.0f - fr) + bottom * fr);
      rgba[ch] = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
    }
    blend(rgba, dst);
  }
}
