// AVX2/FMA small-M packed matmul: the shared FMA kernel (packed_gemv_fma.h) over 8-lane vectors, two
// vectors (16 columns) per block. Compiled for avx2,fma,f16c by the pragma below; called only when the
// CPU has them (cpu_features.cpp).
#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "cpu/vec_avx2.h"
#include "cpu/packed_gemv_fma.h"

namespace saliq {

void fma256_columns(const PackedGemvProblem& p, int64_t n0) { fma_columns_any_bits<VecAvx2, 2>(p, n0); }

}  // namespace saliq

#pragma GCC pop_options
