// Dequantization of packed format v1 into columns of W^T for the prefill GEMM of packed_matmul_ops.cpp
// (M above the GEMV crossover): W^T [K, N] is contiguous along N like the packed words, so a tile of columns
// is read and written row by row, contiguously. Torch-free.
#pragma once

#include <stdint.h>

#include "cpu/packed_gemv.h"

namespace saliq {

enum class DequantOut : int { F32 = 0, F16 = 1, BF16 = 2 };

// out[k * ld + j] = (q[k, n0 + j] - z) * s for k < K, j < nt, computed in fp32 as ref.dequantize does and
// rounded once (to nearest even) to the output type. Picks the AVX-512 kernel when the active ISA allows
// (bf16 output also needs AVX512_BF16), else the portable loops; both give the same bits.
void dequantize_columns(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                        DequantOut type);
void dequantize_columns_avx512(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                               DequantOut type);  // packed_prefill_avx512.cpp

}  // namespace saliq
