// Interface of the small-M packed matmul kernels (y = x W^T, W in packed format v1), torch-free.
// The caller converts x to fp32, padded with zeros to a whole number of 32-element words per row, and
// precomputes per-group sums of x; each kernel covers a range of output columns and writes fp32 y.
#pragma once

#include <stdint.h>

#include "cpu/cpu_features.h"

namespace saliq {

enum class ScaleType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct PackedGemvProblem {
  const float* x;          // [M, k_padded] fp32, zero past K
  const float* x_group_sum;  // [M, G] sum of x over each group
  int64_t M, K, k_padded, N, G, group_len;
  int bits;
  const int32_t* qweight;     // [ceil(K / codes per word), N]
  const int32_t* qweight_hi;  // 3-bit: [ceil(K / 32), N]
  const void* scales;         // [G, N]
  ScaleType scale_type;
  const int16_t* zeros;       // [G, N]
  const float* bias;          // [N] fp32 or null
  float* y;                   // [M, N] fp32
  bool x_is_bf16;             // x holds bf16 values (exactly representable): the bf16 dot-product path may run
};

// Columns [n_begin, n_end), any M, any CPU.
void packed_gemv_portable(const PackedGemvProblem& p, int64_t n_begin, int64_t n_end);
// Each returns how many leading columns it computed (a multiple of its column block); the rest is left
// to the portable kernel. Only callable when active_isa() allows them.
int64_t packed_gemv_avx2(const PackedGemvProblem& p);
int64_t packed_gemv_avx512(const PackedGemvProblem& p);
// bf16 activations on CPUs with AVX512_BF16 (vdpbf16ps); any M.
int64_t packed_gemv_avx512_bf16(const PackedGemvProblem& p);

// Chooses the best path for the active ISA and covers all columns. Parallel (OpenMP) over column blocks.
void packed_gemv(const PackedGemvProblem& p);

// Scale of group g, column n, as fp32.
float load_scale(const void* scales, ScaleType type, int64_t index);

}  // namespace saliq
