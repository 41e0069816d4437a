// Tensor-level wrappers of the CUDA launchers (csrc/cuda/launchers.h); present when SALIQ_WITH_CUDA is set.
// Tensors live on a CUDA device; `stream` is the caller's current cudaStream_t as an integer. These files
// use only device-generic ATen calls, so they build against the CPU-only torch too.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace saliq {

#ifdef SALIQ_WITH_CUDA
constexpr bool kWithCuda = true;

int64_t cuda_device_count();
void cuda_check_device();
// fp16 / bf16 x: the tensor-core decode kernel, M <= 16 (warps per CTA: 0 = its own choice); fp32 x: the
// fp32 GEMV, M <= 8.
at::Tensor packed_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                              const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                              int64_t in_features, const std::optional<at::Tensor>& bias, int64_t stream,
                              int64_t warps, const std::optional<at::Tensor>& sp_rowptr,
                              const std::optional<at::Tensor>& sp_cols, const std::optional<at::Tensor>& sp_vals,
                              const std::optional<at::Tensor>& lora_t, const std::optional<at::Tensor>& lora_B,
                              double lora_scale);
at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features,
                          const std::optional<at::Tensor>& out, int64_t stream);
std::tuple<at::Tensor, at::Tensor> fake_quant_lwc_fwd_cuda(const at::Tensor& W, const at::Tensor& hi,
                                                           const at::Tensor& lo, const std::optional<at::Tensor>& S,
                                                           const std::optional<at::Tensor>& delta, int64_t bits,
                                                           int64_t group_size, bool symmetric, int64_t stream);
std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, std::optional<at::Tensor>> fake_quant_lwc_bwd_cuda(
    const at::Tensor& grad_what, const at::Tensor& grad_reg, const at::Tensor& W, const at::Tensor& hi,
    const at::Tensor& lo, const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& delta, int64_t bits,
    int64_t group_size, bool symmetric, bool need_dW, int64_t stream);
std::tuple<at::Tensor, std::optional<at::Tensor>> saliency_sq_error_cuda(const at::Tensor& A, const at::Tensor& B,
                                                                         const std::optional<at::Tensor>& S,
                                                                         bool need_grad, int64_t stream);
// out = y + x Sp^T, Sp in CSR by output row (a warp per row); into `out` when given (may be y itself).
at::Tensor sparse_addmm_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& rowptr,
                             const at::Tensor& cols, const at::Tensor& vals, const std::optional<at::Tensor>& out,
                             int64_t stream);
#else
constexpr bool kWithCuda = false;
#endif

}  // namespace saliq
