// AVX-512 dequantizer for the prefill GEMM (packed_prefill.h). Per row of W and 16 inputs: shift and mask the
// codes, OR 0x4B000000 (the float 2^23 + q, exact), subtract 2^23 + z (exact: |z| < 2^15), so q - z is exact
// and the one multiply by s rounds as ref.dequantize's does; then one conversion to the output type
// (vcvtneps2bf16 / vcvtps2ph, both round to nearest even; bf16 flushes denormal results, which no scale
// within the format's clamps produces).
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>

#include "cpu/packed_prefill.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

namespace saliq {
namespace {

inline __m512 load_scales(const void* base, ScaleType type, int64_t idx, __mmask16 m) {
  if (type == ScaleType::F32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + idx);
  if (type == ScaleType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Full strips take plain stores: masked stores are slow on some cores (Zen 4).
template <DequantOut T>
inline void store(void* out, int64_t idx, __m512 v, __mmask16 m) {
  if constexpr (T == DequantOut::F32) {
    if (m == 0xFFFF)
      _mm512_storeu_ps(static_cast<float*>(out) + idx, v);
    else
      _mm512_mask_storeu_ps(static_cast<float*>(out) + idx, m, v);
  } else {
    __m256i h;
    if constexpr (T == DequantOut::F16)
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else
      h = (__m256i)_mm512_cvtneps_pbh(v);
    if (m == 0xFFFF)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + idx), h);
    else
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + idx, m, h);
  }
}

// Rows n0 .. n0 + nt - 1 of W, each contiguous along K (out[j * ld + k]), 16 inputs of one row per vector: the
// row's word broadcast and shifted lane by lane (vpsrlvd), its 3-bit hi word rotated so that the hi bit of input
// k lands on bit 2 (vprorvd), one select and one AND-OR as before, so 2-bit costs 5 instructions per 16 weights
// and 3-bit 7. 4-bit: the words of two word rows in the two halves. Loops: group, 16-row strip (its scales
// loaded once; the packed words are read along their rows, which stream, not down the columns), row, word row.
template <int BITS, DequantOut T>
void rows(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i shift = _mm512_mullo_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(kPerWord - 1)),
                                           _mm512_set1_epi32(kWidth));
  // 3-bit: the hi word holds 32 inputs; rotating right by (k % 32) - 2 puts the hi bit of input k on bit 2
  const __m512i rot_lo = _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(30)), _mm512_set1_epi32(31));
  const __m512i rot_hi = _mm512_add_epi32(lane, _mm512_set1_epi32(14));
  const __m512i magic = _mm512_set1_epi32(0x4B000000);
  const __m512 two23 = _mm512_set1_ps(8388608.0f);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k_begin = g * p.group_len, k_end = std::min(k_begin + p.group_len, p.K);
    for (int64_t c = 0; c < nt; c += 16) {
      const int64_t rows_here = std::min<int64_t>(16, nt - c);
      const __mmask16 m = rows_here == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows_here) - 1u);
      const __m512 s16 = load_scales(p.scales, p.scale_type, g * p.N + n0 + c, m);
      const __m512 zz16 = _mm512_add_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p.zeros + g * p.N + n0 + c))), two23);
      for (int64_t jj = 0; jj < rows_here; ++jj) {
        const __m512i pick = _mm512_set1_epi32((int)jj);
        const __m512 s = _mm512_permutexvar_ps(pick, s16), zz = _mm512_permutexvar_ps(pick, zz16);
        const int64_t n = n0 + c + jj;
        const int64_t row_idx = (c + jj) * ld;
        // this row's words of the group, one word row (N words) apart; groups start on a hi word (32 inputs)
        const int32_t* wp = p.qweight + (k_begin / kPerWord) * p.N + n;
        const int32_t* hp = BITS == 3 ? p.qweight_hi + (k_begin / 32) * p.N + n : nullptr;
        // groups are whole words except a per-channel group whose K ends inside a word
#pragma GCC unroll 4
        for (int64_t k0 = k_begin; k0 < k_end; k0 += 16) {
          __m512i w = _mm512_set1_epi32(*wp);
          if (BITS == 4 && k0 + 8 < k_end) w = _mm512_mask_set1_epi32(w, (__mmask16)0xFF00, wp[p.N]);
          wp += (BITS == 4 ? 2 : 1) * p.N;
          const __m512i a = _mm512_srlv_epi32(w, shift);
          __m512i bits;
          if constexpr (BITS == 3) {
            const bool upper = (k0 - k_begin) & 16;  // inputs 16..31 of the hi word
            const __m512i h = _mm512_rorv_epi32(_mm512_set1_epi32(*hp), upper ? rot_hi : rot_lo);
            if (upper) hp += p.N;
            const __m512i sel = _mm512_ternarylogic_epi32(a, h, _mm512_set1_epi32(3), 0xE4);  // c ? a : b
            bits = _mm512_ternarylogic_epi32(sel, _mm512_set1_epi32(7), magic, 0xEA);  // (a & b) | c
          } else {
            bits = _mm512_ternarylogic_epi32(a, _mm512_set1_epi32((1 << kWidth) - 1), magic, 0xEA);
          }
          const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(bits), zz), s);
          const int64_t left = k_end - k0;
          store<T>(out, row_idx + k0, v, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u));
        }
      }
    }
  }
}

template <DequantOut T>
void rows_of_type(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  switch (p.bits) {
    case 2: rows<2, T>(p, n0, nt, out, ld); break;
    case 3: rows<3, T>(p, n0, nt, out, ld); break;
    default: rows<4, T>(p, n0, nt, out, ld); break;
  }
}

}  // namespace

void dequantize_rows_avx512(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                            DequantOut type) {
  switch (type) {
    case DequantOut::F32: rows_of_type<DequantOut::F32>(p, n0, nt, out, ld); break;
    case DequantOut::F16: rows_of_type<DequantOut::F16>(p, n0, nt, out, ld); break;
    case DequantOut::BF16: rows_of_type<DequantOut::BF16>(p, n0, nt, out, ld); break;
  }
}

}  // namespace saliq

#pragma GCC pop_options
