// AVX-512 integer-dot-product GEMV (packed_gemv_int8.h, packed_gemv_int8_avx512.h) for CPUs with AVX-512
// F/BW/VL but without AVX512_VNNI (Skylake-SP): vpmaddubsw + vpaddw into int16 sums, widened every few word rows,
// as the AVX2 form but on 16 lanes. Compiled for exactly those extensions.
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include "cpu/packed_gemv_int8_avx512.h"
#include "cpu/packed_gemv_int8.h"

namespace saliq {

// The columns of a register tile of the 16-lane form `kernel`; here, in the file compiled for the fewest
// extensions.
int64_t int8x512_width(const PackedGemvProblem& p, GemvKernel kernel) {
  if (p.M == 1) return 16 * kVectorsM1;
  return 16 * (kernel == GemvKernel::Int8x512Mad ? kVectorsMMad : p.bits == 3 ? kVectorsM3 : kVectorsMVnni);
}

void int8x512_mad_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecMad512, kVectorsM1, kVectorsMMad, kTileRows>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
