// Per-sample and per-item random parameters of a batch (mirrors render/params.py).
// plan_samples: one thread per sample. plan_items: one thread per item (sample x object slot).
#include "common.cuh"

// FractalDB's 25 weight vectors: (flat position in the row [a b e c d f], weight).
__constant__ int FDB_POSITION[25] = {0, 0, 0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 4, 4, 4, 4, 2, 2, 2, 2, 5, 5, 5, 5};
__constant__ float FDB_WEIGHT[25] = {0.2f, 0.6f, 1.0f, 1.4f, 1.8f, 0.2f, 0.6f, 1.4f, 1.8f, 0.2f, 0.6f, 1.4f, 1.8f,
                                     0.2f, 0.6f, 1.4f, 1.8f, 0.2f, 0.6f, 1.4f, 1.8f, 0.2f, 0.6f, 1.4f, 1.8f};

extern "C" __global__ void plan_samples(int count, const long long *indices, u32 seed, u32 epoch,
                                        const int *ri, const float *rf, long long *label, int *num_objects,
                                        float *sample_f) {
  int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= count) return;
  long long index = indices[b];
  u32 tag = make_tag(STREAM_SAMPLE, 0, 0);
  Words main = draw_words(seed, epoch, index, tag, DRAW_SAMPLE_MAIN);
  int lo = ri[RI_OBJECTS_LO], hi = ri[RI_OBJECTS_HI];
  num_objects[b] = lo + (int)to_int(main.w[0], hi - lo + 1);
  label[b] = ri[RI_MULTI_LABEL] ? -1 : index % ri[RI_NUM_CLASSES];
  float *out = sample_f + (long long)b * SAMPLE_FLOATS;
  bool blur = to_uniform(main.w[1]) < rf[RF_BLUR_P];
  float sigma = to_range(main.w[2], rf, RF_BLUR_SIGMA);
  float inv = 1.0f / ((sigma * sigma) * 2.0f);
  float w1 = exp_neg(inv);
  float norm = (1.0f + w1) + w1;
  out[0] = blur ? 1.0f : 0.0f;
  out[1] = 1.0f / norm;
  out[2] = w1 / norm;
  out[3] = sigma;
  out[4] = exp_neg(to_range(main.w[3], rf, RF_PLASMA_DECAY));
  Words corners = draw_words(seed, epoch, index, tag, DRAW_SAMPLE_CORNERS);
  for (int i = 0; i < 4; ++i) out[5 + i] = to_uniform(corners.w[i]);
  Words hs = draw_words(seed, epoch, index, tag, DRAW_SAMPLE_BG_HS);
  Words v = draw_words(seed, epoch, index, tag, DRAW_SAMPLE_BG_V);
  out[9] = to_range(hs.w[0], rf, RF_PLASMA_HUE_GAIN) * 255.0f;
  out[10] = to_range(hs.w[1], rf, RF_PLASMA_HUE_OFFSET) * 255.0f;
  out[11] = to_range(hs.w[2], rf, RF_PLASMA_SAT_GAIN) * 255.0f;
  out[12] = to_range(hs.w[3], rf, RF_PLASMA_SAT_OFFSET) * 255.0f;
  out[13] = to_range(v.w[0], rf, RF_PLASMA_VAL_GAIN) * 255.0f;
  out[14] = to_range(v.w[1], rf, RF_PLASMA_VAL_OFFSET) * 255.0f;
}

__device__ inline bool singular_value_too_big(const float *row) {
  float a = row[0], b = row[1], c = row[3], d = row[4];
  float s = ((a * a + b * b) + c * c) + d * d;
  float det = a * d - b * c;
  float disc = s * s - (4.0f * det) * det;
  float root = sqrtf(fmaxf(disc, 0.0f));
  return (s + root) * 0.5f > 1.0f;
}

extern "C" __global__ void plan_items(int count, const long long *indices, u32 seed, u32 epoch, const int *ri,
                                      const float *rf, const long long *label, const int *num_objects,
                                      const float *bank_maps, const int *bank_num_maps, int *item_i,
                                      float *item_f) {
  int item = blockIdx.x * blockDim.x + threadIdx.x;
  if (item >= count) return;
  int slots = ri[RI_SLOTS];
  int b = item / slots, slot = item % slots;
  long long index = indices[b];
  u32 tag = make_tag(STREAM_ITEM, (u32)slot, 0);
  int *oi = item_i + (long long)item * ITEM_INTS;
  float *of = item_f + (long long)item * ITEM_FLOATS;
  float *maps = of;

  Words w = draw_words(seed, epoch, index, tag, DRAW_ITEM_SYSTEM);
  long long cls = ri[RI_SOURCE_ANY] ? to_int(w.w[0], ri[RI_NUM_CLASSES]) : label[b];
  long long system = cls * ri[RI_SYSTEMS_PER_CLASS] + to_int(w.w[1], ri[RI_SYSTEMS_PER_CLASS]);
  int nmaps = bank_num_maps[system];
  for (int i = 0; i < MAX_MAPS * ROW; ++i) maps[i] = bank_maps[system * MAX_MAPS * ROW + i];

  int jitter = -1;
  if (ri[RI_JITTER] == JITTER_BASIC) {
    for (int attempt = 0; attempt < ri[RI_JITTER_TRIES]; ++attempt) {
      Words jw = draw_words(seed, epoch, index, tag, DRAW_ITEM_JITTER + attempt);
      int k = (int)to_int(jw.w[0], nmaps);
      float factor = to_range(jw.w[1], rf, RF_JITTER);
      float row[ROW];
      for (int j = 0; j < ROW; ++j) row[j] = maps[k * ROW + j] * factor;
      if (!singular_value_too_big(row)) {
        for (int j = 0; j < ROW; ++j) maps[k * ROW + j] = row[j];
        jitter = attempt;
        break;
      }
    }
  } else if (ri[RI_JITTER] == JITTER_SVD) {  // params._svd_jitter
    for (int attempt = 0; attempt < ri[RI_JITTER_TRIES]; ++attempt) {
      Words jw = draw_words(seed, epoch, index, tag, DRAW_ITEM_JITTER + attempt);
      int k = (int)to_int(jw.w[0], nmaps);
      int part = (int)to_int(jw.w[1], 3);
      float u = to_range(jw.w[2], rf, RF_SVD_JITTER), v = to_range(jw.w[3], rf, RF_SVD_JITTER);
      float s, c;
      sin_cos(u, &s, &c);
      const float *r = maps + k * ROW;
      float row[ROW];
      if (part == 0) {  // R A
        row[0] = c * r[0] - s * r[3], row[1] = c * r[1] - s * r[4], row[2] = r[2];
        row[3] = s * r[0] + c * r[3], row[4] = s * r[1] + c * r[4], row[5] = r[5];
      } else if (part == 1) {  // A R
        row[0] = r[0] * c + r[1] * s, row[1] = r[1] * c - r[0] * s, row[2] = r[2];
        row[3] = r[3] * c + r[4] * s, row[4] = r[4] * c - r[3] * s, row[5] = r[5];
      } else {
        for (int j = 0; j < ROW; ++j) row[j] = r[j];
        row[2] = r[2] + u, row[5] = r[5] + v;
      }
      if (!singular_value_too_big(row)) {
        for (int j = 0; j < ROW; ++j) maps[k * ROW + j] = row[j];
        jitter = attempt;
        break;
      }
    }
  } else if (ri[RI_JITTER] == JITTER_FRACTALDB) {
    jitter = (int)to_int(w.w[2], 25);
    for (int m = 0; m < MAX_MAPS; ++m) maps[m * ROW + FDB_POSITION[jitter]] *= FDB_WEIGHT[jitter];
  }

  // Map probabilities proportional to |det A| (params.map_cumulative).
  float det[MAX_MAPS];
  float total = 0.0f;
  for (int m = 0; m < MAX_MAPS; ++m) {
    const float *r = maps + m * ROW;
    det[m] = m < nmaps ? fabsf(r[0] * r[4] - r[1] * r[3]) : 0.0f;
    total = total + det[m];
  }
  if (!(total > 0.0f) || !finite(total)) {
    for (int m = 0; m < MAX_MAPS; ++m) det[m] = m < nmaps ? 1.0f : 0.0f;
    total = (float)nmaps;
  }
  float running = 0.0f;
  for (int m = 0; m < MAX_MAPS; ++m) {
    running = running + det[m];
    of[IF_CUM + m] = running / total;
  }

  // Fixed point of map 0: the chains' start, on the attractor (params.fixed_point).
  {
    float a = maps[0], bb = maps[1], e = maps[2], c = maps[3], d = maps[4], f = maps[5];
    float m = 1.0f - a, n = 1.0f - d;
    float dt = m * n - bb * c;
    float x = (n * e + bb * f) / dt;
    float y = (c * e + m * f) / dt;
    bool ok = finite(x) && finite(y);
    of[IF_START] = ok ? x : 0.0f;
    of[IF_START + 1] = ok ? y : 0.0f;
  }

  Words win = draw_words(seed, epoch, index, tag, DRAW_ITEM_WINDOW);
  of[IF_SHIFT] = to_range(win.w[0], rf, RF_TRANSLATE);
  of[IF_SHIFT + 1] = to_range(win.w[1], rf, RF_TRANSLATE);
  of[IF_SCALE] = to_range(win.w[2], rf, RF_SCALE);
  of[IF_SCALE + 1] = to_range(win.w[3], rf, RF_SCALE);

  Words look = draw_words(seed, epoch, index, tag, DRAW_ITEM_LOOK);
  Words place = draw_words(seed, epoch, index, tag, DRAW_ITEM_PLACE);
  of[IF_HUE] = to_range(look.w[2], rf, RF_HUE_SHIFT);
  int size = ri[RI_SIZE];
  int side = size, top = 0, left = 0;
  if (ri[RI_MULTI_OBJECT]) {
    side = (int)(to_range(place.w[1], rf, RF_OBJECT_SCALE) * (float)size);
    side = side < 1 ? 1 : side;
    top = (int)to_int(place.w[2], size) - side / 2;
    left = (int)to_int(place.w[3], size) - side / 2;
  }
  oi[0] = slot < num_objects[b];
  oi[1] = (int)system;
  oi[2] = (int)cls;
  oi[3] = nmaps;
  oi[4] = jitter;
  oi[5] = ri[RI_PATCH] == PATCH_IMAGE ? 1 + (int)to_int(look.w[0], 511) : PATCH_CENTRE_ONLY;
  oi[6] = (int)((look.w[1] >> 29) & (u32)ri[RI_FLIP_BITS]);
  oi[7] = (int)(to_range(look.w[3], rf, RF_SAT) * 255.0f);
  oi[8] = (int)(to_range(place.w[0], rf, RF_VAL) * 255.0f);
  oi[9] = side;
  oi[10] = top;
  oi[11] = left;
}
