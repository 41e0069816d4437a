// AVX2 integer-dot-product GEMV (packed_gemv_int8.h) for CPUs without AVX512_VNNI: the dot product of 4 code
// bytes with 4 int8 digits per lane is vpmaddubsw (u8 x s8 pairs -> s16; |2 * 15 * 128| cannot saturate) +
// vpaddw into int16 sums, widened (vpmaddwd with ones) every few word rows. Blocks: 16 columns, tiles of up to
// 2 rows of x (16 ymm registers: kAccumulators). Compiled for avx2,fma,f16c; called only when the CPU has them.
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "cpu/vec_avx2.h"

namespace {

struct VecInt8Avx2 : VecAvx2 {
  static constexpr int kAccumulators = 8;  // of 16 ymm (tiles: 2 rows x 2 digits x 2, 1 x 3 x 2)
  // M = 1: the 4 digits of an operand copied to every lane in memory (Int8Activations::replicas), a plain load
  static constexpr int kDigitReplicasM1 = saliq::kInt8x256DigitReplicasM1;
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
  static I widen16(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
  // 3-bit: byte b of each column's word gets, in bits 2..5, the hi bits of k = 4b .. 4b + 3 of the word row
  // (nibble b of the hi word's 16 bits for this row): vpshufb copies hi byte b / 2 into byte b, then even bytes
  // take their low nibble (<< 2) and odd bytes their high nibble (>> 2); bits 0, 1, 6, 7 are left as they fall
  // (code3 keeps bit 2 of its shifted copy only), so 3-bit costs the dot products of 2-bit.
  static I spread_hi(I h, int half) {
    const I t = half ? _mm256_srli_epi32(h, 16) : h;
    const I x = _mm256_shuffle_epi8(t, _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13, 0, 0, 1, 1,
                                                        4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13));
    return _mm256_blendv_epi8(_mm256_slli_epi16(x, 2), _mm256_srli_epi16(x, 2), _mm256_set1_epi16((short)0xFF00));
  }
  static I code3(I w, I hx, int j, I mask, I /*code3*/) {  // (lo code of k = 4b + j) | 4 * (its hi bit)
    return _mm256_or_si256(and_i(srl(w, 2 * j), mask), and_i(srl(hx, j), _mm256_set1_epi32(0x04040404)));
  }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

int64_t int8x256_width(const PackedGemvProblem& /*p*/) { return 16; }

void int8x256_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecInt8Avx2, 2, 2, 4>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
