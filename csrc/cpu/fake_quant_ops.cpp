// Tensor wrappers of the LWC fake quantization and saliency squared error kernels (fake_quant_kernels.cpp):
// argument checks, fp16/bf16 inputs converted to fp32 (all arithmetic is fp32 as in saliq/ref.py) and
// results cast back to the input dtypes.
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>

#include "cpu/fake_quant_kernels.h"
#include "cpu/ops.h"

namespace saliq {

namespace {

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

const float* opt_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = as_f32(*t);
  return keep.data_ptr<float>();
}

FakeQuantProblem make_problem(const at::Tensor& W, const at::Tensor& hi, const at::Tensor& lo,
                              const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& delta,
                              int64_t bits, int64_t group_size, bool symmetric, at::Tensor* keep) {
  check_bits(bits);
  TORCH_CHECK_VALUE(W.dim() == 2 && W.is_floating_point(), "W must be a 2-D floating point tensor, got ",
                    W.scalar_type(), " ", W.sizes());
  TORCH_CHECK_VALUE(W.device().is_cpu(), "W must be a CPU tensor for the cpp backend");
  const int64_t N = W.size(0), K = W.size(1);
  const int64_t g = group_len_of(group_size, K, "fake_quant_lwc");
  TORCH_CHECK_VALUE(hi.sizes() == at::IntArrayRef({N, K / g}), "hi must be [", N, ", ", K / g, "], got ", hi.sizes());
  TORCH_CHECK_VALUE(lo.sizes() == at::IntArrayRef({N, K / g}), "lo must be [", N, ", ", K / g, "], got ", lo.sizes());
  if (S.has_value()) TORCH_CHECK_VALUE(S->sizes() == W.sizes(), "S must have the shape of W ", W.sizes(), ", got ", S->sizes());
  if (delta.has_value())
    TORCH_CHECK_VALUE(delta->sizes() == W.sizes(), "delta must have the shape of W ", W.sizes(), ", got ",
                      delta->sizes());
  keep[0] = as_f32(W);
  keep[1] = as_f32(hi);
  keep[2] = as_f32(lo);
  FakeQuantProblem p{};
  p.W = keep[0].data_ptr<float>();
  p.hi = keep[1].data_ptr<float>();
  p.lo = keep[2].data_ptr<float>();
  p.S = opt_ptr(S, keep[3]);
  p.delta = opt_ptr(delta, keep[4]);
  p.N = N;
  p.K = K;
  p.group_len = g;
  p.bits = (int)bits;
  p.symmetric = symmetric;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fake_quant_lwc_fwd_cpu(const at::Tensor& W, const at::Tensor& hi,
                                                          const at::Tensor& lo, const std::optional<at::Tensor>& S,
                                                          const std::optional<at::Tensor>& delta, int64_t bits,
                                                          int64_t group_size, bool symmetric) {
  at::Tensor keep[5];
  const FakeQuantProblem p = make_problem(W, hi, lo, S, delta, bits, group_size, symmetric, keep);
  at::Tensor what = at::empty({p.N, p.K}, W.options().dtype(at::kFloat));
  const double reg = fake_quant_lwc_forward(p, what.data_ptr<float>());
  return {what.to(W.scalar_type()), at::scalar_tensor(reg, W.options().dtype(at::kFloat))};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, std::optional<at::Tensor>> fake_quant_lwc_bwd_cpu(
    const at::Tensor& grad_what, const at::Tensor& grad_reg, const at::Tensor& W, const at::Tensor& hi,
    const at::Tensor& lo, const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& delta, int64_t bits,
    int64_t group_size, bool symmetric, bool need_dW) {
  at::Tensor keep[5];
  const FakeQuantProblem p = make_problem(W, hi, lo, S, delta, bits, group_size, symmetric, keep);
  TORCH_CHECK_VALUE(grad_what.sizes() == W.sizes(), "grad_what must have the shape of W ", W.sizes(), ", got ",
                    grad_what.sizes());
  TORCH_CHECK_VALUE(grad_reg.numel() == 1, "grad_reg must be a scalar, got shape ", grad_reg.sizes());
  const at::Tensor gw = as_f32(grad_what);
  const float g_reg = grad_reg.item<float>();
  const auto f32 = W.options().dtype(at::kFloat);
  at::Tensor dW = need_dW ? at::empty({p.N, p.K}, f32) : at::Tensor();
  const bool want_ddelta = delta.has_value() && S.has_value();
  at::Tensor ddelta = want_ddelta ? at::empty({p.N, p.K}, f32) : at::Tensor();
  at::Tensor dhi = at::empty(hi.sizes(), f32), dlo = at::empty(lo.sizes(), f32);
  fake_quant_lwc_backward(p, gw.data_ptr<float>(), g_reg, need_dW ? dW.data_ptr<float>() : nullptr,
                          dhi.data_ptr<float>(), dlo.data_ptr<float>(),
                          want_ddelta ? ddelta.data_ptr<float>() : nullptr);
  std::optional<at::Tensor> dW_out, ddelta_out;
  if (need_dW) dW_out = dW.to(W.scalar_type());
  if (delta.has_value()) ddelta_out = want_ddelta ? ddelta.to(delta->scalar_type()) : at::zeros_like(*delta);
  return {dW_out, dhi.to(hi.scalar_type()), dlo.to(lo.scalar_type()), ddelta_out};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> saliency_sq_error_cpu(const at::Tensor& A, const at::Tensor& B,
                                                                        const std::optional<at::Tensor>& S,
                                                                        bool need_grad) {
  TORCH_CHECK_VALUE(A.sizes() == B.sizes(), "B must have the shape of A ", A.sizes(), ", got ", B.sizes());
  if (S.has_value()) TORCH_CHECK_VALUE(S->sizes() == A.sizes(), "S must have the shape of A ", A.sizes(), ", got ", S->sizes());
  TORCH_CHECK_VALUE(A.is_floating_point() && B.is_floating_point(), "A and B must be floating point");
  const at::Tensor a = as_f32(A), b = as_f32(B);
  at::Tensor s_keep;
  const float* sp = opt_ptr(S, s_keep);
  at::Tensor grad = need_grad ? at::empty(A.sizes(), A.options().dtype(at::kFloat)) : at::Tensor();
  const double loss = saliency_sq_error_kernel(a.data_ptr<float>(), b.data_ptr<float>(), sp, a.numel(),
                                               need_grad ? grad.data_ptr<float>() : nullptr);
  std::optional<at::Tensor> grad_out;
  if (need_grad) grad_out = grad.to(A.scalar_type());
  return {at::scalar_tensor(loss, A.options().dtype(at::kFloat)), grad_out};
}

}  // namespace saliq
