// Deterministic reductions for the CUDA kernels: warp shuffles in a fixed pattern (warp_reduce.cuh), and a
// single-block kernel that sums an array of partials in a fixed order. No atomics, so results do not vary run
// to run.
#pragma once

#include <cuda_runtime.h>

#include "cuda/warp_reduce.cuh"

namespace saliq_cuda {

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
