// out[M, N] = y + x Sp^T for a sparse Sp [N, K] in CSR by output row: the reserved weights of a quantized
// layer, applied after its packed matmul. A warp per row n: lane l sums the row's nonzeros l, l + 32, ... in
// order, for up to kRowsPerPass rows of x at once (x [M, K] row stride ldx), and the warp combines its lanes
// with a fixed shuffle pattern, so the result does not vary from run to run (no atomics). fp32 sums; y is added
// and the result cast once. Entries outside the CSR's bounds are skipped rather than read (the Python layer
// validates the CSR).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/convert.cuh"
#include "cuda/launchers.h"
#include "cuda/warp_reduce.cuh"

namespace {

constexpr int kWarps = 8;         // rows n per block
constexpr int kRowsPerPass = 8;   // rows of x summed per pass over a row's nonzeros (registers per lane)

using saliq_cuda::from_f32;
using saliq_cuda::to_f32;

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    sparse_addmm_kernel(const T* __restrict__ y, const T* __restrict__ x, int64_t ldx, const int32_t* __restrict__ rowptr,
                        const int32_t* __restrict__ cols, const float* __restrict__ vals, int64_t M, int64_t N,
                        int64_t K, int64_t nnz, T* out) {
  const int64_t n = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // the whole warp leaves together: the shuffles below see full warps only
  const int lane = threadIdx.x & 31;
  int64_t b = rowptr[n], e = rowptr[n + 1];
  if (b < 0 || e > nnz || b > e) b = e = 0;
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const int rows = (int)min((int64_t)kRowsPerPass, M - m0);
    float acc[kRowsPerPass];
#pragma unroll
    for (int m = 0; m < kRowsPerPass; ++m) acc[m] = 0.0f;
    for (int64_t j = b + lane; j < e; j += 32) {
      const int32_t c = cols[j];
      if (c < 0 || c >= K) continue;
      const float v = vals[j];
      const T* xc = x + m0 * ldx + c;
#pragma unroll
      for (int m = 0; m < kRowsPerPass; ++m)
        if (m < rows) acc[m] += v * to_f32(xc[m * ldx]);
    }
#pragma unroll
    for (int m = 0; m < kRowsPerPass; ++m) {
      if (m >= rows) break;  // the same for the whole warp: decode (M = 1) does one warp sum, not kRowsPerPass
      const float s = saliq_cuda::warp_sum(acc[m]);
      if (lane == m) {
        const int64_t i = (m0 + m) * N + n;
        out[i] = from_f32<T>(to_f32(y[i]) + s);
      }
    }
  }
}

template <class T>
int launch(const void* y, const void* x, int64_t M, int64_t ldx, int64_t K, int64_t N, const int32_t* rowptr,
           const int32_t* cols, const float* vals, int64_t nnz, void* out, cudaStream_t st) {
  const int64_t blocks = (N + kWarps - 1) / kWarps;
  sparse_addmm_kernel<T><<<(unsigned)blocks, kWarps * 32, 0, st>>>(
      static_cast<const T*>(y), static_cast<const T*>(x), ldx, rowptr, cols, vals, M, N, K, nnz, static_cast<T*>(out));
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int saliq_cuda_sparse_addmm(const void* y, const void* x, int dtype, int64_t M, int64_t ldx, int64_t K,
                                       int64_t N, const int32_t* rowptr, const int32_t* cols, const float* vals,
                                       int64_t nnz, void* out, intptr_t stream) {
  if (M <= 0 || N <= 0) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case SALIQ_F16: return launch<__half>(y, x, M, ldx, K, N, rowptr, cols, vals, nnz, out, st);
    case SALIQ_BF16: return launch<__nv_bfloat16>(y, x, M, ldx, K, N, rowptr, cols, vals, nnz, out, st);
    case SALIQ_F32: return launch<float>(y, x, M, ldx, K, N, rowptr, cols, vals, nnz, out, st);
    default: return (int)cudaErrorInvalidValue;
  }
}
