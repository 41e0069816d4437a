// The 256-bit VNNI form of packed_gemv_avx2_vnni.cpp with the EVEX encoding of the same vpdpbusd (AVX512_VNNI +
// VL), for an AVX-512 CPU capped to avx2vnni: there the form the AVX-VNNI clients run is tested and measured.
// Compiled for avx2,fma,f16c,avx512f,avx512vl,avx512vnni; called only when the CPU has them (cpu_features.h).
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")

#include "cpu/packed_gemv_int8_avx2.h"

namespace {

struct DotEvex {
  static __m256i dot(__m256i acc, __m256i codes, __m256i x) { return _mm256_dpbusd_epi32(acc, codes, x); }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

void int8x256_vnni_evex_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni256<DotEvex>, kAvx2VectorsM1, kAvx2VectorsM, kAvx2TileRows>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
