// LWC fake quantization forward / backward and the saliency squared error on fp32 buffers, torch-free.
// Shapes: W [N, K] row-major, groups of group_len consecutive elements along K, hi / lo / dhi / dlo [N, G].
#pragma once

#include <stdint.h>

namespace saliq {

struct FakeQuantProblem {
  const float* W;
  const float* hi;
  const float* lo;
  const float* S;      // [N, K] or null
  const float* delta;  // [N, K] or null
  int64_t N, K, group_len;
  int bits;
  bool symmetric;
};

// What [N, K]; returns reg = sum S (What + delta - W)^2 (0 when S is null), reduced in a fixed order.
double fake_quant_lwc_forward(const FakeQuantProblem& p, float* what);

// grad_what [N, K]; outputs dhi, dlo [N, G]; dW [N, K] (null: skipped); ddelta [N, K] (null: skipped).
void fake_quant_lwc_backward(const FakeQuantProblem& p, const float* grad_what, float grad_reg, float* dW,
                             float* dhi, float* dlo, float* ddelta);

// sum S (A - B)^2 in double with per-chunk partials summed in order; grad = 2 S (A - B) when non-null.
double saliency_sq_error_kernel(const float* A, const float* B, const float* S, int64_t n, float* grad);

}  // namespace saliq
