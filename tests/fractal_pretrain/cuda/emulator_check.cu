// Kernels that pin down the CUDA emulator's runtime (test_emulator.py): barriers, warp collectives,
// shared memory, and the two bug detectors (thread order, shared-memory poison).
typedef unsigned int u32;

// out[t] = AND over the block of (t >= first), then the block's dynamic shared word written by thread 0.
extern "C" __global__ void barrier_and(int first, int *out) {
  int all = __syncthreads_and(threadIdx.x >= (unsigned)first);
  out[blockIdx.x * blockDim.x + threadIdx.x] = all;
}

// out[flat thread] = blockIdx.y * 100 + blockIdx.x * 10 + threadIdx.x, on a 2-D grid.
extern "C" __global__ void block_coordinates(int *out) {
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  out[block * blockDim.x + threadIdx.x] = blockIdx.y * 100 + blockIdx.x * 10 + threadIdx.x;
}

// Lanes with equal keys (key = lane / group) get the same mask; out[t] = mask, out2[t] = warp max of t.
extern "C" __global__ void warp_ops(int group, u32 *masks, u32 *maxes, int *shuffled) {
  const u32 t = threadIdx.x;
  masks[t] = __match_any_sync(__activemask(), (int)((t % 32) / group));
  maxes[t] = __reduce_max_sync(0xffffffffu, t * 7 % 32);
  shuffled[t] = __shfl_sync(0xffffffffu, (int)t * 10, 31 - (int)(t % 32));
}

// A race: every thread writes the same shared word with no order; thread 0 publishes the winner.
extern "C" __global__ void racy(int *out) {
  __shared__ int winner;
  winner = threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = winner;
}

// Reads shared memory nobody wrote.
extern "C" __global__ void uninitialised(u32 *out) {
  __shared__ u32 never_written[4];
  extern __shared__ u32 dynamic[];
  out[threadIdx.x] = threadIdx.x < 4 ? never_written[threadIdx.x] : dynamic[threadIdx.x - 4];
}

// Lane 0 waits in a warp collective for lanes that wait at a barrier for lane 0: a hang on a GPU.
extern "C" __global__ void deadlock(u32 *out) {
  if (threadIdx.x == 0) out[0] = __match_any_sync(0xffffffffu, 1);
  else __syncthreads();
}

// A block that returns early for some threads: the barrier waits only for the live ones.
extern "C" __global__ void early_exit(int *out) {
  if (threadIdx.x % 2) return;
  __syncthreads();
  out[threadIdx.x] = 2;
}

// Lanes 0..3 vote among themselves, but lane 3 returns instead; lanes 4.. wait at the barrier the voters
// reach after the vote: the vote must complete without lane 3 and without lanes outside its mask.
extern "C" __global__ void vote_without_a_returned_lane(u32 *out) {
  if (threadIdx.x == 3) return;
  if (threadIdx.x < 3) out[threadIdx.x] = __ballot_sync(0xfu, 1);
  __syncthreads();
}

// out[0] = value: a float argument arrives as the float it was.
extern "C" __global__ void store_float(float value, float *out) {
  if (threadIdx.x == 0) out[0] = value;
}

// out[t] = a * b: with a = 1e-30, b = 1e-10 a denormal, unless denormals flush to zero.
extern "C" __global__ void product(float a, float b, float *out) {
  out[threadIdx.x] = a * b;
}
