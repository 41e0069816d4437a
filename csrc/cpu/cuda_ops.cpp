// CUDA ops as tensors: argument checks, output allocation on the input's device, dtype conversion to the
// kernels' fp32 where needed, then the extern "C" launchers of csrc/cuda on the given stream. Every launcher
// error becomes a Python RuntimeError carrying the CUDA error string.
#include "cpu/cuda_ops.h"

#ifdef SALIQ_WITH_CUDA

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "cpu/ops.h"
#include "cuda/launchers.h"

namespace saliq {

namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "saliq cuda backend: ", what, " failed: ", saliq_cuda_error_string(err), " (CUDA error ",
              err, ")");
}

int dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return SALIQ_F32;
    case at::kHalf: return SALIQ_F16;
    case at::kBFloat16: return SALIQ_BF16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return 0;
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got device ", t.device());
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
const float* opt_f32(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = f32(*t);
  return keep.data_ptr<float>();
}

}  // namespace

int64_t cuda_device_count() {
  int count = 0;
  return saliq_cuda_device_count(&count) == 0 ? count : 0;
}

void cuda_check_device() {
  int count = 0;
  const int err = saliq_cuda_device_count(&count);
  TORCH_CHECK(err == 0, "saliq cuda backend: no usable CUDA device: ", saliq_cuda_error_string(err),
              " (CUDA error ", err, ")");
  TORCH_CHECK(count > 0, "saliq cuda backend: no CUDA device is visible");
}

namespace {

// The bias [N] in the activation dtype, contiguous (undefined when absent).
at::Tensor bias_in_dtype(const std::optional<at::Tensor>& bias, int64_t N, at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
  return bias->to(dtype).contiguous();
}

// fp16 / bf16 activations, M <= 16: the tensor-core decode kernel reads x, the packed weight and the scales as
// they are and writes only y (one launch).
at::Tensor decode_mma(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                      const at::Tensor& scales_in, const at::Tensor& zeros, int64_t bits, int64_t g,
                      int64_t in_features, const std::optional<at::Tensor>& bias, int64_t warps, int64_t stream,
                      const std::optional<at::Tensor>& sp_rowptr, const std::optional<at::Tensor>& sp_cols,
                      const std::optional<at::Tensor>& sp_vals, const std::optional<at::Tensor>& lora_t_in,
                      const std::optional<at::Tensor>& lora_B_in, double lora_scale) {
  const int64_t M = x_in.size(0), N = qweight.size(1);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor scales = scales_in.to(x.scalar_type()).contiguous();
  const at::Tensor bias_t = bias_in_dtype(bias, N, x.scalar_type());
  // the reserved weights, when given: int32 CSR by output feature and fp32 values (the caller checked the CSR)
  at::Tensor rp, cols, vals;
  if (sp_rowptr.has_value()) {
    TORCH_CHECK_VALUE(sp_cols.has_value() && sp_vals.has_value(), "sparse rowptr, cols and values go together");
    rp = sp_rowptr->contiguous();
    cols = sp_cols->contiguous();
    vals = sp_vals->contiguous();
    TORCH_CHECK_VALUE(rp.scalar_type() == at::kInt && rp.dim() == 1 && rp.numel() == N + 1 &&
                          rp.device() == x.device(),
                      "sparse rowptr must be int32 [", N + 1, "] on ", x.device(), ", got ", rp.scalar_type(), " ",
                      rp.sizes(), " on ", rp.device());
    TORCH_CHECK_VALUE(cols.scalar_type() == at::kInt && vals.scalar_type() == at::kFloat && cols.dim() == 1 &&
                          vals.sizes() == cols.sizes() && cols.device() == x.device() && vals.device() == x.device(),
                      "sparse cols must be int32 and values float32, both [nnz] on ", x.device());
  }
  // the LoRA term, when given: t = x A^T [M, r] and B [N, r], both converted to x's dtype
  at::Tensor lora_t, lora_B;
  if (lora_t_in.has_value()) {
    TORCH_CHECK_VALUE(lora_B_in.has_value(), "lora_t and lora_B go together");
    lora_t = lora_t_in->to(x.scalar_type()).contiguous();
    lora_B = lora_B_in->to(x.scalar_type()).contiguous();
    const int64_t r = lora_t.dim() == 2 ? lora_t.size(1) : -1;
    TORCH_CHECK_VALUE(lora_t.dim() == 2 && lora_t.size(0) == M && r >= 1 && lora_B.dim() == 2 && lora_B.size(0) == N &&
                          lora_B.size(1) == r && lora_t.device() == x.device() && lora_B.device() == x.device(),
                      "lora_t must be [", M, ", r] and lora_B [", N, ", r] on ", x.device(), ", got ", lora_t.sizes(),
                      " and ", lora_B.sizes());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  check_cuda(saliq_cuda_decode_mma(x.data_ptr(), dtype_code(x.scalar_type(), "x"), M, x.stride(0), in_features, N, g,
                                   (int)bits, qweight.data_ptr<int32_t>(),
                                   bits == 3 ? qweight_hi.data_ptr<int32_t>() : nullptr, scales.data_ptr(),
                                   zeros.data_ptr<int16_t>(), bias_t.defined() ? bias_t.data_ptr() : nullptr,
                                   rp.defined() ? rp.data_ptr<int32_t>() : nullptr,
                                   rp.defined() ? cols.data_ptr<int32_t>() : nullptr,
                                   rp.defined() ? vals.data_ptr<float>() : nullptr,
                                   lora_t.defined() ? lora_t.data_ptr() : nullptr,
                                   lora_t.defined() ? lora_B.data_ptr() : nullptr,
                                   lora_t.defined() ? lora_t.size(1) : 0, (float)lora_scale, y.data_ptr(), (int)warps,
                                   (intptr_t)stream),
             "decode_mma");
  return y;
}

}  // namespace

at::Tensor packed_matmul_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                              const at::Tensor& scales_in, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                              int64_t in_features, const std::optional<at::Tensor>& bias, int64_t stream,
                              int64_t warps, const std::optional<at::Tensor>& sp_rowptr,
                              const std::optional<at::Tensor>& sp_cols, const std::optional<at::Tensor>& sp_vals,
                              const std::optional<at::Tensor>& lora_t, const std::optional<at::Tensor>& lora_B,
                              double lora_scale) {
  check_packed(qweight, qweight_hi, scales_in, zeros, bits, group_size, in_features);
  check_on_cuda(x_in, "x");
  check_on_cuda(qweight, "qweight");
  const int64_t g = group_len_of(group_size, in_features, "packed_matmul");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == in_features, "x must be [M, ", in_features, "], got ",
                    x_in.sizes());
  const int64_t M = x_in.size(0), N = qweight.size(1);
  const int dt = dtype_code(x_in.scalar_type(), "x");
  if (dt != SALIQ_F32) {
    TORCH_CHECK_VALUE(M <= 16, "the cuda decode kernel serves M <= 16 rows of fp16 / bf16 x, got M=", M);
    return decode_mma(x_in, qweight, qweight_hi, scales_in, zeros, bits, g, in_features, bias, warps, stream,
                      sp_rowptr, sp_cols, sp_vals, lora_t, lora_B, lora_scale);
  }
  TORCH_CHECK_VALUE(!sp_rowptr.has_value() && !lora_t.has_value(),
                    "the reserved weights and the LoRA term join only the fp16 / bf16 decode kernel");
  TORCH_CHECK_VALUE(M <= 8, "the cuda packed GEMV serves M <= 8 rows of fp32 x, got M=", M);
  // fp32 x, zero-padded to whole 32-element words (the kernel reads whole packed words)
  const int64_t k_padded = (in_features + 31) / 32 * 32;
  at::Tensor x = at::zeros({M, k_padded}, x_in.options().dtype(at::kFloat));
  x.narrow(1, 0, in_features).copy_(x_in);
  const at::Tensor scales = scales_in.to(x_in.scalar_type()).contiguous();
  const at::Tensor bias_t = bias_in_dtype(bias, N, x_in.scalar_type());
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  const int split_k = saliq_cuda_packed_gemv_split_k(M, in_features, N, g);
  at::Tensor workspace = split_k > 1 ? at::empty({split_k, M, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  check_cuda(saliq_cuda_packed_gemv(x.data_ptr<float>(), dt, M, in_features, N, g, (int)bits, qweight.data_ptr<int32_t>(),
                                    bits == 3 ? qweight_hi.data_ptr<int32_t>() : nullptr, scales.data_ptr(),
                                    zeros.data_ptr<int16_t>(), bias.has_value() ? bias_t.data_ptr() : nullptr,
                                    y.data_ptr(), split_k > 1 ? workspace.data_ptr<float>() : nullptr, split_k,
                                    (intptr_t)stream),
             "packed_gemv");
  return y;
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales_in,
                          const at::Tensor& zeros_in, int64_t bits, int64_t group_size, int64_t in_features,
                          const std::optional<at::Tensor>& out_in, int64_t stream) {
  check_packed(qweight, qweight_hi, scales_in, zeros_in, bits, group_size, in_features);
  check_on_cuda(qweight, "qweight");
  check_on_cuda(scales_in, "scales");
  check_on_cuda(zeros_in, "zeros");
  if (bits == 3) check_on_cuda(qweight_hi, "qweight_hi");
  const int64_t g = group_len_of(group_size, in_features, "dequantize");
  const int64_t N = qweight.size(1);
  const int scale_dt = dtype_code(scales_in.scalar_type(), "scales");
  at::Tensor out;
  if (out_in.has_value()) {
    out = *out_in;
    TORCH_CHECK_VALUE(out.device() == qweight.device() && out.is_contiguous() &&
                          out.sizes() == at::IntArrayRef({N, in_features}),
                      "dequantize: out must be a contiguous [", N, ", ", in_features, "] tensor on ", qweight.device(),
                      ", got ", out.sizes(), " on ", out.device());
  } else {
    out = at::empty({N, in_features}, scales_in.options());
  }
  const int out_dt = dtype_code(out.scalar_type(), "out");
  const at::Tensor qw = qweight.contiguous(), sc = scales_in.contiguous(), z = zeros_in.contiguous();
  const at::Tensor qh = bits == 3 ? qweight_hi.contiguous() : qweight_hi;
  check_cuda(saliq_cuda_dequantize((int)bits, in_features, N, g, qw.data_ptr<int32_t>(),
                                   bits == 3 ? qh.data_ptr<int32_t>() : nullptr, sc.data_ptr(), scale_dt,
                                   z.data_ptr<int16_t>(), out.data_ptr(), out_dt, (intptr_t)stream),
             "dequantize");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fake_quant_lwc_fwd_cuda(const at::Tensor& W, const at::Tensor& hi,
                                                           const at::Tensor& lo, const std::optional<at::Tensor>& S,
                                                           const std::optional<at::Tensor>& delta, int64_t bits,
                                                           int64_t group_size, bool symmetric, int64_t stream) {
  check_bits(bits);
  check_on_cuda(W, "W");
  TORCH_CHECK_VALUE(W.dim() == 2, "W must be 2-D, got ", W.sizes());
  const int64_t N = W.size(0), K = W.size(1), g = group_len_of(group_size, K, "fake_quant_lwc");
  TORCH_CHECK_VALUE(hi.sizes() == at::IntArrayRef({N, K / g}) && lo.sizes() == hi.sizes(), "hi and lo must be [", N,
                    ", ", K / g, "]");
  at::Tensor w = f32(W), h = f32(hi), l = f32(lo), s_keep, d_keep;
  const float* sp = opt_f32(S, s_keep);
  const float* dp = opt_f32(delta, d_keep);
  at::Tensor what = at::empty({N, K}, w.options());
  at::Tensor partials = at::empty({std::max<int64_t>(N * (K / g), 1)}, w.options());
  at::Tensor reg = at::empty({}, w.options());
  check_cuda(saliq_cuda_fake_quant_fwd(w.data_ptr<float>(), h.data_ptr<float>(), l.data_ptr<float>(), sp, dp, N, K, g,
                                       (int)bits, symmetric ? 1 : 0, what.data_ptr<float>(),
                                       partials.data_ptr<float>(), reg.data_ptr<float>(), (intptr_t)stream),
             "fake_quant_lwc_fwd");
  return {what.to(W.scalar_type()), reg};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, std::optional<at::Tensor>> fake_quant_lwc_bwd_cuda(
    const at::Tensor& grad_what, const at::Tensor& grad_reg, const at::Tensor& W, const at::Tensor& hi,
    const at::Tensor& lo, const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& delta, int64_t bits,
    int64_t group_size, bool symmetric, bool need_dW, int64_t stream) {
  check_bits(bits);
  check_on_cuda(W, "W");
  TORCH_CHECK_VALUE(W.dim() == 2 && grad_what.sizes() == W.sizes(), "grad_what must have the shape of W");
  const int64_t N = W.size(0), K = W.size(1), g = group_len_of(group_size, K, "fake_quant_lwc");
  at::Tensor w = f32(W), h = f32(hi), l = f32(lo), gw = f32(grad_what), gr = f32(grad_reg.reshape({})), s_keep,
             d_keep;
  const float* sp = opt_f32(S, s_keep);
  const float* dp = opt_f32(delta, d_keep);
  const auto opts = w.options();
  at::Tensor dW = need_dW ? at::empty({N, K}, opts) : at::Tensor();
  const bool want_ddelta = delta.has_value() && S.has_value();
  at::Tensor ddelta = want_ddelta ? at::empty({N, K}, opts) : at::Tensor();
  at::Tensor dhi = at::empty(hi.sizes(), opts), dlo = at::empty(lo.sizes(), opts);
  check_cuda(saliq_cuda_fake_quant_bwd(gw.data_ptr<float>(), gr.data_ptr<float>(), w.data_ptr<float>(),
                                       h.data_ptr<float>(), l.data_ptr<float>(), sp, dp, N, K, g, (int)bits,
                                       symmetric ? 1 : 0, need_dW ? dW.data_ptr<float>() : nullptr,
                                       dhi.data_ptr<float>(), dlo.data_ptr<float>(),
                                       want_ddelta ? ddelta.data_ptr<float>() : nullptr, (intptr_t)stream),
             "fake_quant_lwc_bwd");
  std::optional<at::Tensor> dW_out, ddelta_out;
  if (need_dW) dW_out = dW.to(W.scalar_type());
  if (delta.has_value()) ddelta_out = want_ddelta ? ddelta.to(delta->scalar_type()) : at::zeros_like(*delta);
  return {dW_out, dhi.to(hi.scalar_type()), dlo.to(lo.scalar_type()), ddelta_out};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> saliency_sq_error_cuda(const at::Tensor& A, const at::Tensor& B,
                                                                         const std::optional<at::Tensor>& S,
                                                                         bool need_grad, int64_t stream) {
  check_on_cuda(A, "A");
  TORCH_CHECK_VALUE(A.sizes() == B.sizes(), "B must have the shape of A ", A.sizes(), ", got ", B.sizes());
  at::Tensor a = f32(A), b = f32(B), s_keep;
  const float* sp = opt_f32(S, s_keep);
  const int64_t n = a.numel();
  at::Tensor grad = need_grad ? at::empty(A.sizes(), a.options()) : at::Tensor();
  at::Tensor partials = at::empty({std::max<int64_t>(saliq_cuda_sq_error_partials(n), 1)}, a.options());
  at::Tensor loss = at::empty({}, a.options());
  check_cuda(saliq_cuda_sq_error(a.data_ptr<float>(), b.data_ptr<float>(), sp, n,
                                 need_grad ? grad.data_ptr<float>() : nullptr, partials.data_ptr<float>(),
                                 loss.data_ptr<float>(), (intptr_t)stream),
             "saliency_sq_error");
  std::optional<at::Tensor> grad_out;
  if (need_grad) grad_out = grad.to(A.scalar_type());
  return {loss, grad_out};
}

at::Tensor sparse_addmm_cuda(const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& rowptr,
                             const at::Tensor& cols, const at::Tensor& vals, const std::optional<at::Tensor>& out_in,
                             int64_t stream) {
  check_on_cuda(x_in, "x");
  check_on_cuda(y_in, "y");
  check_on_cuda(rowptr, "rowptr");
  check_on_cuda(cols, "cols");
  check_on_cuda(vals, "vals");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && y_in.dim() == 2, "sparse_addmm: x and y must be 2-D, got ", x_in.sizes(),
                    " and ", y_in.sizes());
  const int dt = dtype_code(x_in.scalar_type(), "x");
  TORCH_CHECK_VALUE(y_in.scalar_type() == x_in.scalar_type(), "sparse_addmm: y has dtype ", y_in.scalar_type(),
                    "; it must be x's ", x_in.scalar_type());
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.scalar_type() == at::kInt && rowptr.numel() >= 1,
                    "sparse_addmm: rowptr must be int32 [N + 1], got ", rowptr.scalar_type(), " ", rowptr.sizes());
  TORCH_CHECK_VALUE(cols.dim() == 1 && cols.scalar_type() == at::kInt, "sparse_addmm: cols must be int32 [nnz]");
  TORCH_CHECK_VALUE(vals.dim() == 1 && vals.scalar_type() == at::kFloat && vals.numel() == cols.numel(),
                    "sparse_addmm: vals must be float32 with the length of cols (", cols.numel(), ")");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(y_in.size(0) == M && y_in.size(1) == N, "sparse_addmm: y has shape ", y_in.sizes(),
                    "; expected [", M, ", ", N, "]");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor y = y_in.contiguous(), rp = rowptr.contiguous(), c = cols.contiguous(), v = vals.contiguous();
  at::Tensor out;
  if (out_in.has_value()) {
    out = *out_in;
    TORCH_CHECK_VALUE(out.sizes() == y.sizes() && out.scalar_type() == y.scalar_type() && out.is_contiguous() &&
                          out.device() == y.device(),
                      "sparse_addmm: out must be a contiguous tensor like y ", y.sizes());
  } else {
    out = at::empty({M, N}, y.options());
  }
  check_cuda(saliq_cuda_sparse_addmm(y.data_ptr(), x.data_ptr(), dt, M, x.stride(0), K, N, rp.data_ptr<int32_t>(),
                                     c.data_ptr<int32_t>(), v.data_ptr<float>(), c.numel(), out.data_ptr(),
                                     (intptr_t)stream),
             "sparse_addmm");
  return out;
}

}  // namespace saliq

#endif  // SALIQ_WITH_CUDA
