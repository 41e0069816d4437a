// Deterministic reductions for the CUDA kernels: warp shuffles in a fixed pattern, and a single-block
// kernel that sums an array of partials in a fixed order. No atomics, so results do not vary run to run.
#pragma once

#include <cuda_runtime.h>

namespace saliq_cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

constexpr int kReduceThreads = 1024;

// out[0] = sum of partials[0 .. count), one block of kReduceThreads threads: each thread sums a strided
// slice in order, then a shared-memory tree in a fixed order.
static __global__ void __launch_bounds__(kReduceThreads) sum_partials_kernel(const float* __restrict__ partials,
                                                                       int64_t count, float* __restrict__ out) {
  __shared__ float buf[kReduceThreads];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) s += partials[i];
  buf[threadIdx.x] = s;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width >>= 1) {
    if ((int)threadIdx.x < width) buf[threadIdx.x] += buf[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = buf[0];
}

}  // namespace saliq_cuda
