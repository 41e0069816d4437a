// AVX2 integer-dot-product GEMV (packed_gemv_int8.h) for CPUs without any VNNI: the dot product of 4 code bytes
// with 4 int8 digits per lane is vpmaddubsw (u8 x s8 pairs -> s16; |2 * 15 * 128| cannot saturate) + vpaddw into
// int16 sums, widened (vpmaddwd with ones) every few word rows. Blocks: 16 columns, tiles of up to 2 rows of x
// (16 ymm registers: kAccumulators). Compiled for avx2,fma,f16c; called only when the CPU has them.
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "cpu/packed_gemv_int8_avx2.h"

namespace {

struct VecInt8Avx2 : VecInt8Avx2Codes {
  static constexpr int kAccumulators = 8;  // of 16 ymm (tiles: 2 rows x 2 digits x 2, 1 x 3 x 2)
  // int16 sums over a few word rows (kRowsPerInt16Sum), widened once: vpmaddubsw + vpaddw per dot product
  // instead of vpmaddubsw + vpmaddwd + vpaddd (one multiply, not two)
  static constexpr bool kInt16Sums = true;
  static I dot16(I acc, I codes, I x) {
    I sum = _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, x));
    // keeps each sum in order: GCC otherwise re-associates a row's adds into trees whose products, all live at
    // once, spill the 16 ymm registers
    __asm__("" : "+x"(sum));
    return sum;
  }
  static I widen16(I a, short f) { return _mm256_madd_epi16(a, _mm256_set1_epi16(f)); }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

int64_t int8x256_width(const PackedGemvProblem& /*p*/) { return 8 * kAvx2VectorsM1; }

void int8x256_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecInt8Avx2, kAvx2VectorsM1, kAvx2VectorsM, kAvx2TileRows>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
