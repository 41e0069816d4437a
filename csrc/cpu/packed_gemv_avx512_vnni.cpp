// AVX-512 VNNI integer-dot-product GEMV (packed_gemv_int8.h, packed_gemv_int8_avx512.h), the form for CPUs with
// AVX512_VBMI. Blocks: 64 columns (4 words of each row in flight), for M > 1 in tiles of as many rows as the
// accumulators allow (2 at two digits; 3-bit 32 columns, 4 rows). Called only when the CPU has AVX512_VNNI and
// AVX512_VBMI and the AVX-512 path is active (packed_gemv_portable.cpp); packed_gemv_avx512_vnni_novbmi.cpp serves
// VNNI without VBMI.
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")

#include "cpu/packed_gemv_int8_avx512.h"
#include "cpu/packed_gemv_int8.h"

namespace saliq {

void int8x512_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni512<true>, kVectorsM1, kVectorsMVnni, kTileRows, kVectorsM3>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
