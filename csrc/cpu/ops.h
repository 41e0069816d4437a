// Tensor-level entry points of saliq._C (CPU), one per op of saliq/ref.py and saliq/packing.py, with the
// same arguments and results. Bound to Python in module.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

#include "cpu/packed_gemv.h"
#include "cpu/sliced_sparse.h"

namespace saliq {

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& q, int64_t bits);
at::Tensor unpack_cpu(const at::Tensor& qweight, const at::Tensor& qweight_hi, int64_t bits, int64_t in_features);
at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features);
at::Tensor packed_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                             const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             int64_t in_features, const std::optional<at::Tensor>& bias);
// QuantLinear's forward in one call: x What^T + lora_scale (x A^T) B^T + bias (quant_linear_ops.cpp).
at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                            int64_t in_features, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                            double lora_scale);
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// Largest M that packed_matmul_cpu serves with the GEMV kernels (above it: dequantized tiles + at::mm).
int64_t packed_matmul_gemv_max_m();
void set_packed_matmul_gemv_max_m(int64_t m);

std::tuple<at::Tensor, at::Tensor> fake_quant_lwc_fwd_cpu(const at::Tensor& W, const at::Tensor& hi,
                                                          const at::Tensor& lo, const std::optional<at::Tensor>& S,
                                                          const std::optional<at::Tensor>& delta, int64_t bits,
                                                          int64_t group_size, bool symmetric);
std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, std::optional<at::Tensor>> fake_quant_lwc_bwd_cpu(
    const at::Tensor& grad_what, const at::Tensor& grad_reg, const at::Tensor& W, const at::Tensor& hi,
    const at::Tensor& lo, const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& delta, int64_t bits,
    int64_t group_size, bool symmetric, bool need_dW);
std::tuple<at::Tensor, std::optional<at::Tensor>> saliency_sq_error_cpu(const at::Tensor& A, const at::Tensor& B,
                                                                        const std::optional<at::Tensor>& S,
                                                                        bool need_grad);

// out = y + x Sp^T, Sp [N, K] in CSR by output row (sparse_ops.cpp); into `out` when given (may be y itself).
at::Tensor sparse_addmm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols,
                            const at::Tensor& vals, const std::optional<at::Tensor>& out);

// y += x Sp^T in place, Sp in slices of 16 rows (sliced_sparse.h, sliced_sparse_ops.cpp); returns y.
at::Tensor sliced_sparse_addmm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& slot_ptr,
                                   const at::Tensor& slot_lanes, const at::Tensor& lane_rows, const at::Tensor& cols,
                                   const at::Tensor& vals);
// The slices' tensors checked (shapes, dtypes, device) for N rows of Sp; x, M and ldx left for the caller.
SliceProblem checked_slices(int64_t N, const at::Tensor& slot_ptr, const at::Tensor& slot_lanes,
                            const at::Tensor& lane_rows, const at::Tensor& cols, const at::Tensor& vals);
// quant_linear_cpu followed by the slices' y += x Sp^T; in the GEMV regime the slices' chunks share the GEMV's
// threads and one pass adds them to its fp32 output (quant_linear_ops.cpp).
at::Tensor quant_linear_sliced_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                                   const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                   int64_t in_features, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                   double lora_scale, const at::Tensor& slot_ptr, const at::Tensor& slot_lanes,
                                   const at::Tensor& lane_rows, const at::Tensor& cols, const at::Tensor& vals);

// Shared argument checks (packing_ops.cpp).
void check_bits(int64_t bits);
int64_t group_len_of(int64_t group_size, int64_t in_features, const char* where);
void check_packed(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features);
// The weight's fields of a PackedGemvProblem (packed_gemv.h) from checked tensors, in format v1 ([rows, N]) or the
// CPU word order (1-D, word_order.h); M, x, y, bias and the activation fields are the caller's.
PackedGemvProblem packed_problem(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t group_len, int64_t in_features);
// Output columns N of a packed weight: qweight's second dimension, or the scales' for a 1-D (CPU word order) one.
int64_t packed_columns(const at::Tensor& qweight, const at::Tensor& scales);
// Where a plane's words lie: band 1 (format v1) for a 2-D tensor, the CPU word order's bands for a 1-D one.
PlaneOrder plane_order(const at::Tensor& words, int64_t in_features, int width, int64_t n);
// 3-bit planes in format v1 ([rows, n] / [ceil(rows / 2), n]) with their bits re-packed into the CPU word order's
// layout (into_cpu_layout) or back (word_order.h); saliq/word_order.py orders the words.
std::tuple<at::Tensor, at::Tensor> repack3_cpu(const at::Tensor& lo, const at::Tensor& hi, bool into_cpu_layout);
// Both planes in the CPU word order (1-D) copied back to format v1 ([rows, n], 3-bit codes in format v1's bits);
// 2-D planes as they are.
std::pair<at::Tensor, at::Tensor> planes_to_v1(const at::Tensor& qweight, const at::Tensor& qweight_hi, int bits,
                                               int64_t in_features, int64_t n);

}  // namespace saliq
