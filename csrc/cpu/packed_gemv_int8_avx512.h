// Vector traits of the 16-lane integer-dot-product GEMV (packed_gemv_int8.h) for the AVX-512 CPUs of three
// generations. With AVX512_VNNI one vpdpbusd per 4 inputs x 16 columns x digit (VecVnni512), its 3-bit hi bits
// joined to the codes by one vpmultishiftqb per word row where AVX512_VBMI exists (Ice Lake, Zen 4) or by a byte
// shuffle, two 16-bit shifts and a masked blend where it does not (Cascade Lake). Without VNNI (Skylake-SP),
// vpmaddubsw + vpaddw into int16 sums as the AVX2 form, on 16 lanes (VecMad512). Include it only after the file's
// `#pragma GCC target`; each form lives in a file compiled for just the extensions it uses, so that no
// instruction of a missing extension can reach a CPU without it.
#pragma once

#include "cpu/vec_avx512.h"

namespace {

// Byte b of each column's word gets, in bits 2..5, the hi bits of k = 4b .. 4b + 3 of the word row (nibble b of
// the hi word's 16 bits for this row): vpshufb copies hi byte b / 2 into byte b, then even bytes take its low
// nibble (<< 2) and odd bytes its high nibble (>> 2); the other bits are left as they fall (removed after each
// shift). AVX512BW.
inline __m512i spread_hi_shuffle(__m512i h, int half) {
  const __m512i t = half ? _mm512_srli_epi32(h, 16) : h;
  const __m512i x = _mm512_shuffle_epi8(t, _mm512_set4_epi32(0x0D0D0C0C, 0x09090808, 0x05050404, 0x01010000));
  return _mm512_mask_blend_epi8((__mmask64)0xAAAAAAAAAAAAAAAAULL, _mm512_slli_epi16(x, 2), _mm512_srli_epi16(x, 2));
}

// The CPU word order's 3-bit layout (word_order.h): nibble b of the row's 16 hi bits (bits 16 half + 4b of the
// column's hi word) -> bits 0..3 of byte b: vpshufb copies hi byte 2 half + b / 2 into byte b, odd bytes take its
// high nibble; bits 4..7 are left as they fall (code3_cpu masks them). AVX512BW.
inline __m512i spread_hi_cpu_shuffle(__m512i h, int half) {
  const __m512i x = _mm512_shuffle_epi8(h, half ? _mm512_set4_epi32(0x0F0F0E0E, 0x0B0B0A0A, 0x07070606, 0x03030202)
                                                : _mm512_set4_epi32(0x0D0D0C0C, 0x09090808, 0x05050404, 0x01010000));
  return _mm512_mask_blend_epi8((__mmask64)0xAAAAAAAAAAAAAAAAULL, x, _mm512_srli_epi16(x, 4));
}

// Register tiles of the 16-lane forms: kVectorsM1 zmm of columns (64) for M = 1; for M > 1 tiles of up to
// kTileRows rows of x (tile_rows: no more than kAccumulators) over 64 columns with VNNI at 2 and 4 bits (2 rows at
// two digits, 1 at three), 32 at 3 bits (4 rows at two digits, 2 at three: int8_columns_bg) and without VNNI
// (int8x512_width, packed_gemv_avx512_mad.cpp). Cycles per word row and row of x against 32-column tiles, M = 2 /
// 4 / 8 / 16, two digits: 2-bit 9.8 / 10.0 / 10.0 / 10.2 -> 9.2 / 9.3 / 9.4 / 9.3, 4-bit (M = 2 / 4 / 16) 6.0 /
// 5.2 / 5.5 -> 5.0 / 5.1 / 4.9; 3-bit, whose tile also holds the hi words, no faster (12.5-12.9 either way, three
// digits 17.0-19.4 -> 17.8-20.2).
constexpr int kVectorsM1 = 4, kVectorsMVnni = 4, kVectorsM3 = 2, kVectorsMMad = 2, kTileRows = 4;

// What the 16-lane forms share: the 3-bit codes of a word row.
struct VecInt8Avx512 : VecAvx512 {
  static constexpr int kDigitReplicasM1 = 1;  // the digits of an operand broadcast from memory
  // bits 0-1 from the lo word shifted by 2j, bit 2 from the spread hi word shifted by j (one ternary select, one
  // AND)
  static I code3(I w, I hx, int j, I mask, I code3) {
    return _mm512_and_si512(_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 2 * j), _mm512_srli_epi32(hx, j), mask,
                                                      0xE4),
                            code3);
  }
  // the CPU word order's layout: w's byte holds j = 0, 1 whole and the low bits of 3, the spread hx's nibble 2 and
  // 3's third bit (for j = 3 one ternary select, one AND)
  static I code3_cpu(I w, I hx, int j, I mask, I code3) {
    switch (j) {
      case 0: return _mm512_and_si512(w, code3);
      case 1: return _mm512_and_si512(_mm512_srli_epi32(w, 3), code3);
      case 2: return _mm512_and_si512(hx, code3);
      default:
        return _mm512_and_si512(
            _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 6), _mm512_srli_epi32(hx, 1), mask, 0xE4), code3);
    }
  }
};

template <bool kVbmi>
struct VecVnni512 : VecInt8Avx512 {
  static constexpr int kAccumulators = 18;  // of 32 zmm (tiles: 4 rows x 2 digits x 2, 3 x 3 x 2)
  static constexpr bool kInt16Sums = false;  // vpdpbusd sums into int32 itself
  static I dot(I acc, I codes, I x) { return _mm512_dpbusd_epi32(acc, codes, x); }
  static I spread_hi(I h, int half) {
    if constexpr (kVbmi) {
      // byte b of column word c = bits 16 half + 4b - 2 .. + 5 of hi word c (vpmultishiftqb takes 8 bits at any
      // offset of the qword holding two columns)
      return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(half ? 0x3A36322E1A16120ELL : 0x2A26221E0A06023ELL),
                                          h);
    } else {
      return spread_hi_shuffle(h, half);
    }
  }
  static I spread_hi_cpu(I h, int half) {
    if constexpr (kVbmi) {  // byte b of column word c = bits 16 half + 4b .. + 7 of hi word c
      return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(half ? 0x3C3834301C181410LL : 0x2C2824200C080400LL), h);
    } else {
      return spread_hi_cpu_shuffle(h, half);
    }
  }
};

struct VecMad512 : VecInt8Avx512 {
  static constexpr int kAccumulators = 8;  // int16 sums: tiles of 2 rows x 2 digits x 2, 1 x 3 x 2 (measured best)
  static constexpr bool kInt16Sums = true;  // as the AVX2 form (packed_gemv_avx2_int8.cpp)
  static I dot16(I acc, I codes, I x) {
    I sum = _mm512_add_epi16(acc, _mm512_maddubs_epi16(codes, x));
    __asm__("" : "+v"(sum));  // each sum in order: re-associated trees of products spill (see the AVX2 form)
    return sum;
  }
  static I widen16(I a, short f) { return _mm512_madd_epi16(a, _mm512_set1_epi16(f)); }
  static I spread_hi(I h, int half) { return spread_hi_shuffle(h, half); }
  static I spread_hi_cpu(I h, int half) { return spread_hi_cpu_shuffle(h, half); }
};

}  // namespace
