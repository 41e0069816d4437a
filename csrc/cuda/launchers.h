// extern "C" launchers of the CUDA kernels: device pointers, sizes and a stream (cudaStream_t passed as an
// integer, the caller's current stream). No torch and no CUDA headers, so any C++ code can include it.
// Every function returns a cudaError_t value (0 = success); saliq_cuda_error_string describes it.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Data types of activations / scales / outputs.
enum SaliqDtype { SALIQ_F32 = 0, SALIQ_F16 = 1, SALIQ_BF16 = 2 };

int saliq_cuda_device_count(int* count);
const char* saliq_cuda_error_string(int error);

// y[M, N] = x[M, K] W^T + bias for M <= 8, W in packed format v1. x: fp32 [M, k_padded], k_padded = K
// rounded up to a multiple of 32, zero past K. scales [G, N], bias [N] and y [M, N] share `dtype`.
// workspace: fp32 [split_k, M, N] when split_k > 1 (partial sums reduced in a fixed order), else unused.
int saliq_cuda_packed_gemv(const float* x, int dtype, int64_t M, int64_t K, int64_t N, int64_t group_len, int bits,
                           const int32_t* qweight, const int32_t* qweight_hi, const void* scales,
                           const int16_t* zeros, const void* bias, void* y, float* workspace, int split_k,
                           intptr_t stream);
// Split-K factor the GEMV launcher would like for this shape (1 = none).
int saliq_cuda_packed_gemv_split_k(int64_t M, int64_t K, int64_t N, int64_t group_len);

// y[M, N] = x[M, K] W^T + bias for 1 <= M <= 16 fp16 / bf16 rows (dtype SALIQ_F16 or SALIQ_BF16; scales, bias
// and y share it), W in packed format v1, on the tensor cores with fp32 accumulation. Row m of x starts at
// x + m * ldx; y is [M, N] contiguous. One launch, no workspace, deterministic. warps: warps per CTA (1..16),
// 0 for the built-in choice. group_len: 32, 64, 128 or K. Added before y's one rounding when given (null: none):
// sp_rowptr [N + 1], sp_cols [nnz], sp_vals fp32 [nnz], reserved weights (CSR by output feature): x Sp^T;
// lora_t [M, lora_r] (= x A^T) and lora_B [N, lora_r] in x's dtype: lora_scale t B^T.
int saliq_cuda_decode_mma(const void* x, int dtype, int64_t M, int64_t ldx, int64_t K, int64_t N, int64_t group_len,
                          int bits, const int32_t* qweight, const int32_t* qweight_hi, const void* scales,
                          const int16_t* zeros, const void* bias, const int32_t* sp_rowptr, const int32_t* sp_cols,
                          const float* sp_vals, const void* lora_t, const void* lora_B, int64_t lora_r,
                          float lora_scale, void* y, int warps, intptr_t stream);
// The warps per CTA saliq_cuda_decode_mma chooses for this shape on the current device (negative: -error).
int saliq_cuda_decode_mma_warps(int dtype, int64_t M, int64_t K, int64_t N, int64_t group_len, int bits);
// How the decode kernel feeds 2- and 4-bit codes to the tensor cores at M = 1 with fp16 x from now on: 0 (the
// default) exact fp16 integers made by a packed fma per code pair, 1 the codes masked in place as fp16 subnormals
// (exact only where the tensor cores take subnormal operands: benchmarks/probes/mma_subnormals.cu). Returns the
// previous setting, or -1 (nothing changed) for another value. Process-wide and not thread-safe: for the
// benchmark and tests that compare the two.
int saliq_cuda_decode_mma_set_codes(int codes);

// out[N, K] = (q - z) * s from packed format v1 (saliq/ref.py dequantize): fp32 arithmetic, one rounding to
// out_dtype. scales [G, N] in scale_dtype; out contiguous; group_len: the group size, or K for one group.
int saliq_cuda_dequantize(int bits, int64_t K, int64_t N, int64_t group_len, const int32_t* qweight,
                          const int32_t* qweight_hi, const void* scales, int scale_dtype, const int16_t* zeros,
                          void* out, int out_dtype, intptr_t stream);

// LWC fake quantization on fp32 buffers (the C++ side converts fp16 / bf16). W, S, delta, what: [N, K];
// hi, lo: [N, G]. reg_partials: fp32 [N * G] scratch; reg: fp32 scalar (sum S (What + delta - W)^2, 0 if S null).
int saliq_cuda_fake_quant_fwd(const float* W, const float* hi, const float* lo, const float* S, const float* delta,
                              int64_t N, int64_t K, int64_t group_len, int bits, int symmetric, float* what,
                              float* reg_partials, float* reg, intptr_t stream);
// dW / ddelta may be null (not computed).
int saliq_cuda_fake_quant_bwd(const float* grad_what, const float* grad_reg, const float* W, const float* hi,
                              const float* lo, const float* S, const float* delta, int64_t N, int64_t K,
                              int64_t group_len, int bits, int symmetric, float* dW, float* dhi, float* dlo,
                              float* ddelta, intptr_t stream);

// loss = sum S (A - B)^2 over n fp32 elements (S may be null); grad = 2 S (A - B) when non-null.
// partials: fp32 scratch of saliq_cuda_sq_error_partials(n) elements.
int64_t saliq_cuda_sq_error_partials(int64_t n);
int saliq_cuda_sq_error(const float* A, const float* B, const float* S, int64_t n, float* grad, float* partials,
                        float* loss, intptr_t stream);

// out[M, N] = y + x Sp^T for Sp [N, K] in CSR by output row (rowptr [N + 1], cols [nnz], vals fp32 [nnz]);
// x [M, K] with row stride ldx; y, out [M, N] contiguous (out may be y). x, y and out share `dtype`. fp32 sums in a
// fixed order: deterministic. Entries outside the CSR's bounds are skipped.
int saliq_cuda_sparse_addmm(const void* y, const void* x, int dtype, int64_t M, int64_t ldx, int64_t K, int64_t N,
                            const int32_t* rowptr, const int32_t* cols, const float* vals, int64_t nnz, void* out,
                            intptr_t stream);

#ifdef __cplusplus
}
#endif
