// 8-lane code traits shared by the AVX2 forms of the integer-dot-product GEMV (packed_gemv_int8.h): the 3-bit
// code assembly and the M = 1 digit operand. Each form adds its dot product: vpmaddubsw + vpaddw int16 sums
// (packed_gemv_avx2_int8.cpp) or 256-bit vpdpbusd (packed_gemv_avx2_vnni*.cpp). Include it only after the file's
// `#pragma GCC target("avx2,fma,f16c...")`.
#pragma once

#include "cpu/vec_avx2.h"

namespace {

struct VecInt8Avx2Codes : VecAvx2 {
  // M = 1: the 4 digits of an operand copied to every lane in memory (Int8Activations::replicas), a plain load
  // (a broadcast costs a shuffle on Zen, and the load folds into the dot product as its memory operand)
  static constexpr int kDigitReplicasM1 = saliq::kInt8x256DigitReplicasM1;
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
  // The CPU word order's 3-bit layout (word_order.h): nibble b of the row's 16 hi bits (bits 16 half + 4b of the
  // column's hi word) -> bits 0..3 of byte b: vpshufb copies hi byte 2 half + b / 2 into byte b, odd bytes take its
  // high nibble; bits 4..7 are left as they fall (code3_cpu masks them)
  static I spread_hi_cpu(I h, int half) {
    const I x = _mm256_shuffle_epi8(
        h, half ? _mm256_setr_epi8(2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15, 2, 2, 3, 3, 6, 6, 7, 7, 10,
                                   10, 11, 11, 14, 14, 15, 15)
                : _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13, 0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9,
                                   9, 12, 12, 13, 13));
    return _mm256_blendv_epi8(x, _mm256_srli_epi16(x, 4), _mm256_set1_epi16((short)0xFF00));
  }
  // code of k = 4b + j in byte b: w's byte holds j = 0, 1 whole and the low bits of 3, hx's nibble 2 and 3's third
  // bit: one or two operations a code, five for j = 3
  static I code3_cpu(I w, I hx, int j, I mask, I code3) {
    switch (j) {
      case 0: return and_i(w, code3);
      case 1: return and_i(srl(w, 3), code3);
      case 2: return and_i(hx, code3);
      default: return _mm256_or_si256(and_i(srl(w, 6), mask), and_i(srl(hx, 1), _mm256_set1_epi32(0x04040404)));
    }
  }
};

// The 256-bit VNNI forms (VEX and EVEX encodings of one instruction): a dot product is one vpdpbusd into int32,
// no int16 sums to widen. Dot supplies the intrinsic of the file's encoding. Tiles as the AVX2 form's: at M = 1
// two vectors (16 columns) and three digits are 6 accumulators, each a chain of 4 dependent vpdpbusd per word
// row; tried on Zen 4 (latency 4, 2 per cycle): an accumulator per shift, or the odd shifts' products added
// off the chain, measured no faster (docs/NOTES.md).
template <class Dot>
struct VecVnni256 : VecInt8Avx2Codes {
  static constexpr int kAccumulators = 8;  // of 16 ymm, as the AVX2 form (tiles: 2 rows x 2 digits x 2, 1 x 3 x 2)
  static constexpr bool kInt16Sums = false;
  static I dot(I acc, I codes, I x) {
    I sum = Dot::dot(acc, codes, x);
    // each sum in order: GCC otherwise loads a whole group's digit operands ahead and spills them (2-bit, three
    // digits: 30.6 cycles a word row without it, 18.4 with it)
    __asm__("" : "+x"(sum));
    return sum;
  }
};

// Register tiles of the 256-bit forms: 2 vectors (16 columns), up to 4 rows of x (tile_rows caps them).
constexpr int kAvx2VectorsM1 = 2, kAvx2VectorsM = 2, kAvx2TileRows = 4;

}  // namespace
