// Saliency-weighted squared error sum S (A - B)^2 (S optional) with its gradient 2 S (A - B).
// Work split: a grid whose size depends only on n; each block sums a grid-stride slice (per-thread in
// order, then warps, then warps in order) into one partial; a single block then sums the partials in order.
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/reduce.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

__global__ void __launch_bounds__(kThreads) sq_error_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                                            const float* __restrict__ S, int64_t n,
                                                            float* __restrict__ grad, float* __restrict__ partials) {
  float acc = 0.0f;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += stride) {
    const float diff = A[i] - B[i];
    const float weighted = S ? S[i] * diff : diff;
    if (grad) grad[i] = 2.0f * weighted;
    acc += weighted * diff;
  }
  __shared__ float warp_partials[kThreads / 32];
  acc = saliq_cuda::warp_sum(acc);
  if ((threadIdx.x & 31) == 0) warp_partials[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_partials[w];
    partials[blockIdx.x] = s;
  }
}

}  // namespace

extern "C" int64_t saliq_cuda_sq_error_partials(int64_t n) {
  const int64_t blocks = (n + kThreads * 8 - 1) / (kThreads * 8);
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

extern "C" int saliq_cuda_sq_error(const float* A, const float* B, const float* S, int64_t n, float* grad,
                                   float* partials, float* loss, intptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = saliq_cuda_sq_error_partials(n);
  sq_error_kernel<<<(unsigned)blocks, kThreads, 0, st>>>(A, B, S, n, grad, partials);
  saliq_cuda::sum_partials_kernel<<<1, saliq_cuda::kReduceThreads, 0, st>>>(partials, blocks, loss);
  return (int)cudaGetLastError();
}
