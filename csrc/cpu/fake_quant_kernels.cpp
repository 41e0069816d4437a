// LWC fake quantization (docs/ARCHITECTURE.md 1.1) on the CPU: forward (with the fused saliency term),
// closed-form straight-through backward, and the saliency squared error.
// Work split: OpenMP over weight rows (dynamic chunks of 8 rows); a row's groups are processed by one
// thread, each group in two passes over its elements (extremes, then values). Reductions: per-row
// (per-chunk for the squared error) partials written to an array and summed in index order, so results do
// not depend on the thread count.
// The per-element and per-group arithmetic is csrc/common/quant_math.h, the code the CUDA kernels run.
#include "cpu/fake_quant_kernels.h"

#include <vector>

#include "common/quant_math.h"

namespace saliq {

namespace {

// Element loops carry `omp simd` (with reductions for extremes, counts and sums) so that the compiler
// vectorises them; the target clones compile each row function for AVX-512, AVX2 and the baseline, chosen
// when the library loads. A given binary on a given CPU always reduces in the same order.

struct GroupStats {
  float wmax, wmin;
  float count_max, count_min;
};

inline GroupStats group_extremes(const float* w, int64_t len, bool count_ties) {
  float wmax = w[0], wmin = w[0];
#pragma omp simd reduction(max : wmax) reduction(min : wmin)
  for (int64_t i = 0; i < len; ++i) {
    wmax = w[i] > wmax ? w[i] : wmax;
    wmin = w[i] < wmin ? w[i] : wmin;
  }
  float cmax = 0.0f, cmin = 0.0f;
  if (count_ties) {
#pragma omp simd reduction(+ : cmax, cmin)
    for (int64_t i = 0; i < len; ++i) {
      cmax += w[i] == wmax ? 1.0f : 0.0f;
      cmin += w[i] == wmin ? 1.0f : 0.0f;
    }
  }
  return GroupStats{wmax, wmin, cmax, cmin};
}

// Forward of one weight row; returns the row's saliency term. GL: the group length when it is a compile-time
// constant (32, 64, 128: loops without remainders), 0 for any other.
template <int GL>
inline __attribute__((always_inline)) double forward_row_impl(const FakeQuantProblem& p, int64_t n, float* what) {
  const int64_t len = GL ? GL : p.group_len;
  const int64_t G = p.K / len;
  const float qmax = (float)qmax_of(p.bits);
  double reg = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t off = n * p.K + g * len;
    const float* w = p.W + off;
    const GroupStats st = group_extremes(w, len, false);
    const LwcGroup q = lwc_scale_zero(st.wmax, st.wmin, sigmoid(p.hi[n * G + g]), sigmoid(p.lo[n * G + g]),
                                      p.bits, p.symmetric);
    float* out = what + off;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = fake_quant_elem(w[i], q.s, q.z, qmax).what;
    if (p.S != nullptr) {
      const float* sal = p.S + off;
      float acc = 0.0f;
      if (p.delta != nullptr) {
        const float* d = p.delta + off;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < len; ++i) {
          const float diff = out[i] + d[i] - w[i];
          acc += sal[i] * diff * diff;
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < len; ++i) {
          const float diff = out[i] - w[i];
          acc += sal[i] * diff * diff;
        }
      }
      reg += (double)acc;
    }
  }
  return reg;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) double forward_row(const FakeQuantProblem& p,
                                                                                   int64_t n, float* what) {
  switch (p.group_len) {
    case 32: return forward_row_impl<32>(p, n, what);
    case 64: return forward_row_impl<64>(p, n, what);
    case 128: return forward_row_impl<128>(p, n, what);
    default: return forward_row_impl<0>(p, n, what);
  }
}

// Backward of one weight row. GL as in forward_row_impl; the flags say which optional tensors exist, so
// the element loop has no run-time branches and vectorises. ddelta is written when HAS_DELTA (the wrapper
// passes it whenever S and delta are both given).
template <int GL, bool HAS_S, bool HAS_DELTA, bool NEED_DW>
inline __attribute__((always_inline)) void backward_row_impl(const FakeQuantProblem& p, int64_t n,
                                                             const float* grad_what, float grad_reg, float* dW,
                                                             float* dhi, float* dlo, float* ddelta) {
  const int64_t len = GL ? GL : p.group_len;
  const int64_t G = p.K / len;
  const float qmax = (float)qmax_of(p.bits);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t off = n * p.K + g * len;
    const float* w = p.W + off;
    const GroupStats st = group_extremes(w, len, NEED_DW);
    const float fmax = sigmoid(p.hi[n * G + g]), fmin = sigmoid(p.lo[n * G + g]);
    const LwcGroup q = lwc_scale_zero(st.wmax, st.wmin, fmax, fmin, p.bits, p.symmetric);
    const float* gw = grad_what + off;
    float g_s = 0.0f;
#pragma omp simd reduction(+ : g_s)
    for (int64_t i = 0; i < len; ++i) {
      const FakeQuantElem e = fake_quant_elem(w[i], q.s, q.z, qmax);
      float g_total = gw[i], g_reg_w = 0.0f;
      if constexpr (HAS_S) {
        const float weff = HAS_DELTA ? e.what + p.delta[off + i] : e.what;
        g_reg_w = saliency_grad(grad_reg, p.S[off + i], weff, w[i]);
        g_total += g_reg_w;
        if constexpr (HAS_DELTA) ddelta[off + i] = g_reg_w;
      }
      if constexpr (NEED_DW) dW[off + i] = (in_range(e.t, qmax) ? g_total : 0.0f) - g_reg_w;
      g_s += g_total * dwhat_ds(e, q.z, qmax);
    }
    const LwcGroupGrads gg = lwc_group_grads(g_s, q, st.wmax, st.wmin, fmax, fmin, p.bits, p.symmetric);
    dhi[n * G + g] = gg.dhi;
    dlo[n * G + g] = gg.dlo;
    if constexpr (NEED_DW) {  // amax / amin spread their gradient evenly over ties
      const float add_max = gg.d_xmax * fmax / st.count_max;
      const float add_min = gg.d_xmin * fmin / st.count_min;
      float* d = dW + off;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        d[j] += w[j] == st.wmax ? add_max : 0.0f;
        d[j] += w[j] == st.wmin ? add_min : 0.0f;
      }
    }
  }
}

template <bool HAS_S, bool HAS_DELTA, bool NEED_DW>
inline __attribute__((always_inline)) void backward_row_flags(const FakeQuantProblem& p, int64_t n,
                                                              const float* grad_what, float grad_reg, float* dW,
                                                              float* dhi, float* dlo, float* ddelta) {
  switch (p.group_len) {
    case 32: return backward_row_impl<32, HAS_S, HAS_DELTA, NEED_DW>(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta);
    case 64: return backward_row_impl<64, HAS_S, HAS_DELTA, NEED_DW>(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta);
    case 128:
      return backward_row_impl<128, HAS_S, HAS_DELTA, NEED_DW>(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta);
    default: return backward_row_impl<0, HAS_S, HAS_DELTA, NEED_DW>(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void backward_row(
    const FakeQuantProblem& p, int64_t n, const float* grad_what, float grad_reg, float* dW, float* dhi,
    float* dlo, float* ddelta) {
  const bool has_s = p.S != nullptr, has_delta = has_s && p.delta != nullptr && ddelta != nullptr;
#define SALIQ_BWD(S_, D_, W_) backward_row_flags<S_, D_, W_>(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta)
  if (!has_s) {
    if (dW) SALIQ_BWD(false, false, true);
    else SALIQ_BWD(false, false, false);
  } else if (!has_delta) {
    if (dW) SALIQ_BWD(true, false, true);
    else SALIQ_BWD(true, false, false);
  } else {
    if (dW) SALIQ_BWD(true, true, true);
    else SALIQ_BWD(true, true, false);
  }
#undef SALIQ_BWD
}

}  // namespace

double fake_quant_lwc_forward(const FakeQuantProblem& p, float* what) {
  std::vector<double> row_reg(p.N, 0.0);
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t n = 0; n < p.N; ++n) row_reg[n] = forward_row(p, n, what);
  double total = 0.0;
  for (int64_t n = 0; n < p.N; ++n) total += row_reg[n];
  return total;
}

void fake_quant_lwc_backward(const FakeQuantProblem& p, const float* grad_what, float grad_reg, float* dW,
                             float* dhi, float* dlo, float* ddelta) {
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t n = 0; n < p.N; ++n) backward_row(p, n, grad_what, grad_reg, dW, dhi, dlo, ddelta);
}

namespace {

__attribute__((target_clones("avx512f", "avx2", "default"))) double sq_error_chunk(
    const float* A, const float* B, const float* S, int64_t i0, int64_t i1, float* grad) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = i0; i < i1; ++i) {
    const float diff = A[i] - B[i];
    const float weighted = S ? S[i] * diff : diff;
    if (grad) grad[i] = 2.0f * weighted;
    acc += (double)(weighted * diff);
  }
  return acc;
}

}  // namespace

double saliency_sq_error_kernel(const float* A, const float* B, const float* S, int64_t n, float* grad) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t c = 0; c < chunks; ++c)
    partial[c] = sq_error_chunk(A, B, S, c * kChunk, (c + 1) * kChunk < n ? (c + 1) * kChunk : n, grad);
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

}  // namespace saliq
