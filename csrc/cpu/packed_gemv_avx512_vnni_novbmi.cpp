// AVX-512 VNNI integer-dot-product GEMV (packed_gemv_int8.h, packed_gemv_int8_avx512.h) for CPUs with AVX512_VNNI
// but without AVX512_VBMI (Cascade Lake): the same kernel, the 3-bit hi bits spread with AVX512BW shuffles. This
// file is compiled without avx512vbmi so that none of its instructions can need it.
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

#include "cpu/packed_gemv_int8_avx512.h"
#include "cpu/packed_gemv_int8.h"

namespace saliq {

void int8x512_novbmi_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni512<false>, kVectorsM1, kVectorsMVnni, kTileRows, kVectorsM3>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
