// Host build of common.cuh's __host__ __device__ helpers, driven by test_kernels.py: reads commands on
// stdin, prints results, so the CUDA-side Philox, uniform draws, exp_neg and HSV colour can be compared
// with NumPy on a machine without a GPU.
#include <cstdio>
#include <cstring>

#include "common.cuh"

int main() {
  char cmd[32];
  while (std::scanf("%31s", cmd) == 1) {
    if (!std::strcmp(cmd, "philox")) {
      unsigned c[4], k[2];
      std::scanf("%u %u %u %u %u %u", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]);
      Words w = philox4x32(c[0], c[1], c[2], c[3], k[0], k[1]);
      std::printf("%u %u %u %u\n", w.w[0], w.w[1], w.w[2], w.w[3]);
    } else if (!std::strcmp(cmd, "uniform")) {
      unsigned w;
      std::scanf("%u", &w);
      std::printf("%.9g\n", (double)to_uniform(w));
    } else if (!std::strcmp(cmd, "expneg")) {
      float x;
      std::scanf("%f", &x);
      float y = exp_neg(x);
      unsigned bits;
      std::memcpy(&bits, &y, 4);
      std::printf("%u\n", bits);
    } else if (!std::strcmp(cmd, "hsv")) {
      int h, s, v;
      std::scanf("%d %d %d", &h, &s, &v);
      unsigned char rgb[3];
      hsv_to_rgb(h, s, v, rgb);
      std::printf("%d %d %d\n", rgb[0], rgb[1], rgb[2]);
    }
  }
  return 0;
}
