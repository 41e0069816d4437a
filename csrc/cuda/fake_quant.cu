// LWC fake quantization forward (with the fused saliency term) and its straight-through backward on fp32.
// Work split: one warp per (row n, group g), four groups per 128-thread block; a warp strides over its
// group's elements (group extremes, tie counts and gradient sums by warp shuffles in a fixed pattern). The
// saliency term: one partial per group, then a single block sums the partials in order (deterministic).
// Per-element and per-group arithmetic: csrc/common/quant_math.h, the code the CPU backend runs and tests.
#include <cuda_runtime.h>

#include "common/quant_math.h"
#include "cuda/launchers.h"
#include "cuda/reduce.cuh"

namespace {

using namespace saliq;
using saliq_cuda::warp_max;
using saliq_cuda::warp_min;
using saliq_cuda::warp_sum;

constexpr int kWarpsPerBlock = 4;

struct GroupRef {
  int64_t offset;  // of the group's first element in [N, K]
  int64_t index;   // n * G + g
};

__device__ __forceinline__ bool group_of_warp(int64_t N, int64_t K, int64_t group_len, GroupRef* ref) {
  const int64_t G = K / group_len;
  const int64_t index = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (index >= N * G) return false;
  ref->index = index;
  ref->offset = (index / G) * K + (index % G) * group_len;
  return true;
}

// Max and min of one group, reduced over the warp that owns it (every lane gets both).
__device__ __forceinline__ void group_extremes(const float* w, int64_t group_len, int lane, float* wmax,
                                               float* wmin) {
  float hi = -INFINITY, lo = INFINITY;
  for (int64_t i = lane; i < group_len; i += 32) {
    hi = fmaxf(hi, w[i]);
    lo = fminf(lo, w[i]);
  }
  *wmax = warp_max(hi);
  *wmin = warp_min(lo);
}

__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    fake_quant_fwd_kernel(const float* __restrict__ W, const float* __restrict__ hi, const float* __restrict__ lo,
                          const float* __restrict__ S, const float* __restrict__ delta, int64_t N, int64_t K,
                          int64_t group_len, int bits, bool symmetric, float* __restrict__ what,
                          float* __restrict__ reg_partials) {
  GroupRef ref;
  if (!group_of_warp(N, K, group_len, &ref)) return;
  const int lane = threadIdx.x & 31;
  const float* w = W + ref.offset;
  float wmax, wmin;
  group_extremes(w, group_len, lane, &wmax, &wmin);
  const LwcGroup q = lwc_scale_zero(wmax, wmin, sigmoid(hi[ref.index]), sigmoid(lo[ref.index]), bits, symmetric);
  const float qmax = (float)qmax_of(bits);
  float reg = 0.0f;
  for (int64_t i = lane; i < group_len; i += 32) {
    const float v = fake_quant_elem(w[i], q.s, q.z, qmax).what;
    what[ref.offset + i] = v;
    if (S) {
      const float diff = (delta ? v + delta[ref.offset + i] : v) - w[i];
      reg += S[ref.offset + i] * diff * diff;
    }
  }
  if (S) {
    reg = warp_sum(reg);
    if (lane == 0) reg_partials[ref.index] = reg;
  }
}

__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    fake_quant_bwd_kernel(const float* __restrict__ grad_what, const float* __restrict__ grad_reg_ptr,
                          const float* __restrict__ W, const float* __restrict__ hi, const float* __restrict__ lo,
                          const float* __restrict__ S, const float* __restrict__ delta, int64_t N, int64_t K,
                          int64_t group_len, int bits, bool symmetric, float* __restrict__ dW,
                          float* __restrict__ dhi, float* __restrict__ dlo, float* __restrict__ ddelta) {
  GroupRef ref;
  if (!group_of_warp(N, K, group_len, &ref)) return;
  const int lane = threadIdx.x & 31;
  const float* w = W + ref.offset;
  float wmax, wmin;
  group_extremes(w, group_len, lane, &wmax, &wmin);
  const float fmax = sigmoid(hi[ref.index]), fmin = sigmoid(lo[ref.index]);
  const LwcGroup q = lwc_scale_zero(wmax, wmin, fmax, fmin, bits, symmetric);
  const float qmax = (float)qmax_of(bits);
  const float grad_reg = S ? *grad_reg_ptr : 0.0f;
  float g_s = 0.0f, count_max = 0.0f, count_min = 0.0f;
  for (int64_t i = lane; i < group_len; i += 32) {
    const int64_t at = ref.offset + i;
    const FakeQuantElem e = fake_quant_elem(w[i], q.s, q.z, qmax);
    float g_total = grad_what[at], g_reg_w = 0.0f;
    if (S) {
      const float weff = delta ? e.what + delta[at] : e.what;
      g_reg_w = saliency_grad(grad_reg, S[at], weff, w[i]);
      g_total += g_reg_w;
      if (ddelta) ddelta[at] = g_reg_w;
    }
    g_s += g_total * dwhat_ds(e, q.z, qmax);
    if (dW) {
      dW[at] = (in_range(e.t, qmax) ? g_total : 0.0f) - g_reg_w;
      count_max += w[i] == wmax ? 1.0f : 0.0f;
      count_min += w[i] == wmin ? 1.0f : 0.0f;
    }
  }
  g_s = warp_sum(g_s);
  const LwcGroupGrads gg = lwc_group_grads(g_s, q, wmax, wmin, fmax, fmin, bits, symmetric);
  if (lane == 0) {
    dhi[ref.index] = gg.dhi;
    dlo[ref.index] = gg.dlo;
  }
  if (dW) {  // amax / amin spread their gradient evenly over ties; each lane revisits its own elements
    count_max = warp_sum(count_max);
    count_min = warp_sum(count_min);
    const float add_max = gg.d_xmax * fmax / count_max, add_min = gg.d_xmin * fmin / count_min;
    for (int64_t i = lane; i < group_len; i += 32) {
      if (w[i] == wmax) dW[ref.offset + i] += add_max;
      if (w[i] == wmin) dW[ref.offset + i] += add_min;
    }
  }
}

unsigned blocks_for(int64_t N, int64_t K, int64_t group_len) {
  return (unsigned)((N * (K / group_len) + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

extern "C" int saliq_cuda_fake_quant_fwd(const float* W, const float* hi, const float* lo, const float* S,
                                         const float* delta, int64_t N, int64_t K, int64_t group_len, int bits,
                                         int symmetric, float* what, float* reg_partials, float* reg,
                                         intptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (N > 0) {
    fake_quant_fwd_kernel<<<blocks_for(N, K, group_len), 32 * kWarpsPerBlock, 0, st>>>(
        W, hi, lo, S, delta, N, K, group_len, bits, symmetric != 0, what, reg_partials);
  }
  if (S != nullptr && N > 0) {
    saliq_cuda::sum_partials_kernel<<<1, saliq_cuda::kReduceThreads, 0, st>>>(reg_partials, N * (K / group_len), reg);
  } else {
    cudaMemsetAsync(reg, 0, sizeof(float), st);
  }
  return (int)cudaGetLastError();
}

extern "C" int saliq_cuda_fake_quant_bwd(const float* grad_what, const float* grad_reg, const float* W,
                                         const float* hi, const float* lo, const float* S, const float* delta,
                                         int64_t N, int64_t K, int64_t group_len, int bits, int symmetric, float* dW,
                                         float* dhi, float* dlo, float* ddelta, intptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (N > 0) {
    fake_quant_bwd_kernel<<<blocks_for(N, K, group_len), 32 * kWarpsPerBlock, 0, st>>>(
        grad_what, grad_reg, W, hi, lo, S, delta, N, K, group_len, bits, symmetric != 0, dW, dhi, dlo, ddelta);
  }
  return (int)cudaGetLastError();
}
