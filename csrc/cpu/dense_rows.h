// Dot products of rows of a dense matrix with rows of x: QuantLinear's LoRA terms (the down-projection t = scale x A^T,
// and the up-projection y += t B^T, added into the layer's output) and the dense GEMV of dense_linear_cpu (A = W).
// A in fp32, bf16 or fp16; x and the sums in fp32.
//
// Why explicit vectors: the compiler's loop kept one chain of dependent adds per row (and no FMA: GCC does not
// contract under -std=c++20), ~1,000 cycles a 4096-long row, so a bf16 4096 x 4096 GEMV took 1.05 ms on one Zen 5
// core, and fp16 rows were converted one element at a time (16.3 ms). Here each row runs four FMA chains over
// alternate blocks of its length, and bf16 / fp16 are widened in registers (F16C for fp16). A row at a time, not
// four side by side: four rows' streams read from DRAM slower than one (bf16 4096 x 4096, one thread: 1.43-1.49 ms
// against 1.25-1.28 for the old single chain); up to four rows of x share each block of a row where they fit in
// 16 KB (dense_rows.cpp). Rows shorter than a vector (a LoRA up-projection of rank 1 or 2, the
// ranks the demo keeps) run as plain loops: a masked vector and its reduction cost ~15 cycles a row where the row
// has one or two products (rank 1, 1536 columns: ~6 us against ~1.5).
#pragma once

#include <stdint.h>

namespace saliq {

enum class DenseType : int { F32 = 0, BF16 = 1, F16 = 2 };

// t[m * ldt + j] = scale * sum_k A[j * K + k] x[m * ldx + k] for rows j in [j0, j1) and m in [0, M); with
// `accumulate`, t[m * ldt + j] += that instead. Each row's sum is computed alone, so results do not depend on how
// callers split the rows (among threads, say).
void dense_rows(const float* x, int64_t M, int64_t ldx, const void* A, DenseType type, int64_t K, int64_t ldt,
                float scale, int64_t j0, int64_t j1, float* t, bool accumulate = false);

}  // namespace saliq
