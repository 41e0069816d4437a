// Warp reductions in a fixed shuffle pattern: every lane gets the same result, the same from run to run. Kept
// apart from reduce.cuh, whose partial-sum kernel every file including it carries, for kernels that need only
// these.
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

}  // namespace saliq_cuda
