// Small-M packed matmul for bf16 activations with AVX512_BF16 (vdpbf16ps: per fp32 lane, two bf16 products
// added to the fp32 accumulator). A packed word shifted right by j * width and masked puts the codes of two
// inputs in the low bits of each 16-bit half; OR-ing 0x4300 makes each half the bf16 number 128 + code
// (exact: bf16 has 8 significant bits). x is bf16 already, so every product is exact in fp32; the 128
// offset is removed per group with y += s * (acc - (z + 128) * sum_group(x)). Pairs: (j, j + 8) for 2/3-bit
// words, (j, j + 4) for 4-bit words; the activations are rearranged once per call into those pairs.
// Accuracy: fp32 sums of the offset products lose a few bits to the offset (relative error ~1e-5 on random
// data), far inside the bf16 tolerance. Work split: blocks of 32 columns (handed to threads by the plan in
// packed_gemv_portable.cpp), a 4-row x 2-vector register tile per block.
#include <immintrin.h>
#include <stdint.h>

#include <cstring>
#include <vector>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

#include "cpu/vec_avx512.h"

namespace {

constexpr int kVectors = 2;

inline uint32_t bf16_bits(float v) {  // exact for values that came from bf16
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b >> 16;
}

// L3: 3-bit codes in the CPU word order's bits (word_order.h), else format v1's.
template <int BITS, int MT, bool L3 = false>
void bf16_block(const saliq::PackedGemvProblem& p, const uint32_t* pairs, int64_t pairs_per_row, int64_t n0,
                int64_t m0) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  constexpr int kPairs = kPerWord / 2;
  const __m512i mask = _mm512_set1_epi32(BITS == 4 ? 0x000F000F : 0x00030003);
  const __m512i magic = _mm512_set1_epi32(0x43004300);
  const __m512i bit2 = _mm512_set1_epi32(0x00040004);
  const __m512i code3 = _mm512_set1_epi32(0x00070007);
  __m512 yacc[MT][kVectors];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < kVectors; ++v) yacc[m][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc[MT][kVectors];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < kVectors; ++v) acc[m][v] = _mm512_setzero_ps();
    const int64_t r_begin = g * p.group_len / kPerWord;
    const int64_t r_end = ((g + 1) * p.group_len + kPerWord - 1) / kPerWord;
    for (int64_t r = r_begin; r < r_end; ++r) {
      __m512i w[kVectors], h4[kVectors];
      const saliq::PlaneOrder::Row wrow = p.lo.row(p.qweight, r);
      const saliq::PlaneOrder::Row hrow = BITS == 3 ? p.hi.row(p.qweight_hi, r >> 1) : saliq::PlaneOrder::Row{};
      for (int v = 0; v < kVectors; ++v) {
        w[v] = _mm512_loadu_si512(wrow.at(n0 + v * 16));
        if (BITS == 3) {  // hi bits j and j + 8 of this word row -> bits j and 16 + j (format v1: 2 + j, 18 + j)
          const __m512i hh = _mm512_srli_epi32(_mm512_loadu_si512(hrow.at(n0 + v * 16)), 16 * (int)(r & 1));
          const __m512i spread = _mm512_or_si512(_mm512_and_si512(hh, _mm512_set1_epi32(0xFF)),
                                                 _mm512_slli_epi32(_mm512_and_si512(hh, _mm512_set1_epi32(0xFF00)), 8));
          h4[v] = L3 ? spread : _mm512_slli_epi32(spread, 2);
        }
      }
      const uint32_t* xp = pairs + r * kPairs;
#pragma GCC unroll 8
      for (int j = 0; j < kPairs; ++j) {
        __m512i c[kVectors];
        for (int v = 0; v < kVectors; ++v) {
          if (L3) {  // inputs j = 4b + i and j + 8: bytes b and b + 2 of w, nibbles b and b + 2 of the hi bits
            const int b = j >> 2, i = j & 3;
            const __m512i src =
                i == 2 ? _mm512_srli_epi32(h4[v], 4 * b) : _mm512_srli_epi32(w[v], 8 * b + (i == 3 ? 6 : 3 * i));
            c[v] = _mm512_ternarylogic_epi32(src, i == 3 ? mask : code3, magic, 0xEA);  // (a&b)|c
            if (i == 3) c[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(h4[v], 4 * b + 1), bit2, c[v], 0xEA);
          } else {
            c[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w[v], j * kWidth), mask, magic, 0xEA);  // (a&b)|c
            if (BITS == 3) c[v] = _mm512_or_si512(c[v], _mm512_and_si512(_mm512_srli_epi32(h4[v], j), bit2));
          }
        }
        for (int m = 0; m < MT; ++m) {
          const __m512i xb = _mm512_set1_epi32((int)xp[(m0 + m) * pairs_per_row + j]);
          for (int v = 0; v < kVectors; ++v)
            acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)c[v], (__m512bh)xb);
        }
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      const int64_t idx = g * p.N + n0 + v * 16;
      const __m512 s = VecAvx512::load_scales(p.scales, p.scale_type, idx);
      const __m512 z = _mm512_add_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + idx)))),
          _mm512_set1_ps(128.0f));
      for (int m = 0; m < MT; ++m) {
        const __m512 xs = _mm512_set1_ps(p.x_group_sum[(m0 + m) * p.G + g]);
        yacc[m][v] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, acc[m][v]), yacc[m][v]);
      }
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    const __m512 b = p.bias ? _mm512_loadu_ps(p.bias + n0 + v * 16) : _mm512_setzero_ps();
    for (int m = 0; m < MT; ++m) _mm512_storeu_ps(p.y + (m0 + m) * p.N + n0 + v * 16, _mm512_add_ps(yacc[m][v], b));
  }
}

template <int BITS, bool L3 = false>
void bf16_columns_bits(const saliq::PackedGemvProblem& p, const uint32_t* pairs, int64_t ppr, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) bf16_block<BITS, 4, L3>(p, pairs, ppr, n0, m);
  switch (p.M - m) {
    case 3: bf16_block<BITS, 3, L3>(p, pairs, ppr, n0, m); break;
    case 2: bf16_block<BITS, 2, L3>(p, pairs, ppr, n0, m); break;
    case 1: bf16_block<BITS, 1, L3>(p, pairs, ppr, n0, m); break;
    default: break;
  }
}

}  // namespace

namespace saliq {

void bf16_pairs(const PackedGemvProblem& p, uint32_t* pairs) {
  // x rearranged into 32-bit pairs of bf16 values in the order the words hold the codes
  const int per_word = p.bits == 4 ? 8 : 16, half = per_word / 2;
  const int64_t ppr = p.k_padded / 2;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.k_padded;
    for (int64_t r = 0; r < p.k_padded / per_word; ++r)
      for (int j = 0; j < half; ++j)
        pairs[m * ppr + r * half + j] =
            bf16_bits(x[r * per_word + j]) | (bf16_bits(x[r * per_word + j + half]) << 16);
  }
}

void bf16_columns(const PackedGemvProblem& p, const uint32_t* pairs, int64_t n0) {
  const int64_t ppr = p.k_padded / 2;
  switch (p.bits) {
    case 2: bf16_columns_bits<2>(p, pairs, ppr, n0); break;
    case 3:  // the CPU word order re-packs 3-bit codes
      if (p.lo.band > 1) bf16_columns_bits<3, true>(p, pairs, ppr, n0);
      else bf16_columns_bits<3>(p, pairs, ppr, n0);
      break;
    default: bf16_columns_bits<4>(p, pairs, ppr, n0); break;
  }
}

}  // namespace saliq

#pragma GCC pop_options
