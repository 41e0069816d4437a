// Dequantization of packed format v1 into rows of W for the prefill GEMM of packed_matmul_ops.cpp (M above the
// GEMV crossover). Rows contiguous along K are what F.linear hands its GEMM (x W^T with W [N, K]): oneDNN's bf16
// GEMM ran ~5% faster on tiles of W rows than on tiles of W^T [K, N] (docs/NOTES.md). Torch-free.
#pragma once

#include <stdint.h>

#include "cpu/packed_gemv.h"

namespace saliq {

enum class DequantOut : int { F32 = 0, F16 = 1, BF16 = 2 };

// out[j * ld + k] = (q[n0 + j, k] - z) * s for j < nt, k < K, computed in fp32 as ref.dequantize does and
// rounded once (to nearest even) to the output type. Picks the AVX-512 kernel when the active ISA allows
// (bf16 output also needs AVX512_BF16), else the portable loops; both give the same bits.
void dequantize_rows(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld, DequantOut type);
void dequantize_rows_avx512(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                            DequantOut type);  // packed_prefill_avx512.cpp

}  // namespace saliq
