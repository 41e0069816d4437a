// 256-bit VNNI integer-dot-product GEMV (packed_gemv_int8.h) for CPUs with AVX-VNNI and no AVX-512 (Intel client
// cores from Alder Lake, Sierra Forest): one VEX vpdpbusd per dot product into int32, where the AVX2 form needs
// vpmaddubsw + vpaddw and a widening. Tiles and code handling as the AVX2 form (packed_gemv_int8_avx2.h).
// Compiled for avx2,fma,f16c,avxvnni; called only when the CPU has AVX-VNNI (cpu_features.h: vnni256).
#include <algorithm>

#include "cpu/packed_gemv.h"

#if SALIQ_HAS_AVXVNNI

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

#include "cpu/packed_gemv_int8_avx2.h"

namespace {

struct DotVex {
  static __m256i dot(__m256i acc, __m256i codes, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, codes, x); }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

void int8x256_vnni_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni256<DotVex>, kAvx2VectorsM1, kAvx2VectorsM, kAvx2TileRows>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options

#else  // a compiler without AVX-VNNI: vnni256() never selects this form

void saliq::int8x256_vnni_columns(const PackedGemvProblem&, const Int8Activations&, int64_t, int64_t) {}

#endif
