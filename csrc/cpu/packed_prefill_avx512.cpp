// AVX-512 dequantizer for the prefill GEMM (packed_prefill.h). Per 16 columns and input k: shift and mask the
// word, OR 0x4B000000 (the float 2^23 + q, exact), subtract 2^23 + z (exact: |z| < 2^15), so q - z is exact
// and the one multiply by s rounds as ref.dequantize's does; then one conversion to the output type
// (vcvtneps2bf16 / vcvtps2ph, both round to nearest even; bf16 flushes denormal results, which no scale
// within the format's clamps produces). Loops: group, 16-column strip, k, so a group's rows of the tile
// (64 x tile width) stay in L1 while written.
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

// 2^23 + code as a float's bits. 3-bit: h2 holds this word row's 16 hi bits shifted to bits 2..17, so after
// a shift by j its bit 2 is code bit 2; one select takes bits 0-1 from the word, the rest from h2, and one
// AND-OR keeps the 3 code bits under the exponent (8 instructions per 16 weights, 2-bit 6).
template <int BITS>
inline __m512i code_bits(__m512i w, __m512i h2, int j) {
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const __m512i magic = _mm512_set1_epi32(0x4B000000);
  const __m512i a = _mm512_srli_epi32(w, j * kWidth);
  if (BITS != 3)
    return _mm512_ternarylogic_epi32(a, _mm512_set1_epi32((1 << kWidth) - 1), magic, 0xEA);  // (a & b) | c
  const __m512i sel = _mm512_ternarylogic_epi32(a, _mm512_srli_epi32(h2, j), _mm512_set1_epi32(3), 0xE4);  // c ? a : b
  return _mm512_ternarylogic_epi32(sel, _mm512_set1_epi32(7), magic, 0xEA);
}

template <int BITS, DequantOut T>
void columns(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  const __m512 two23 = _mm512_set1_ps(8388608.0f);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k_begin = g * p.group_len, k_end = std::min(k_begin + p.group_len, p.K);
    for (int64_t c = 0; c < nt; c += 16) {
      const __mmask16 m = nt - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nt - c)) - 1u);
      const int64_t n = n0 + c;
      const __m512 s = load_scales(p.scales, p.scale_type, g * p.N + n, m);
      const __m512 zz = _mm512_add_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p.zeros + g * p.N + n))), two23);
      // groups are whole words except a per-channel group whose K ends inside a word
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kPerWord) {
        const __m512i w = _mm512_maskz_loadu_epi32(m, p.qweight + (k0 / kPerWord) * p.N + n);
        __m512i h2 = _mm512_setzero_si512();
        if (BITS == 3) {  // a word row is 16 inputs: the low or the high half of a hi word
          const __m512i h = _mm512_maskz_loadu_epi32(m, p.qweight_hi + (k0 / 32) * p.N + n);
          h2 = _mm512_slli_epi32(k0 % 32 ? _mm512_srli_epi32(h, 16) : h, 2);
        }
        auto one = [&](int j) {
          const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(code_bits<BITS>(w, h2, j)), zz), s);
          store<T>(out, (k0 + j) * ld + c, v, m);
        };
        if (k_end - k0 >= kPerWord) {
#pragma GCC unroll 16
          for (int j = 0; j < kPerWord; ++j) one(j);
        } else {
          for (int j = 0; j < (int)(k_end - k0); ++j) one(j);
        }
      }
    }
  }
}

template <DequantOut T>
void columns_of_type(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  switch (p.bits) {
    case 2: columns<2, T>(p, n0, nt, out, ld); break;
    case 3: columns<3, T>(p, n0, nt, out, ld); break;
    default: columns<4, T>(p, n0, nt, out, ld); break;
  }
}

}  // namespace

void dequantize_columns_avx512(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                               DequantOut type) {
  switch (type) {
    case DequantOut::F32: columns_of_type<DequantOut::F32>(p, n0, nt, out, ld); break;
    case DequantOut::F16: columns_of_type<DequantOut::F16>(p, n0, nt, out, ld); break;
    case DequantOut::BF16: columns_of_type<DequantOut::BF16>(p, n0, nt, out, ld); break;
  }
}

}  // namespace saliq

#pragma GCC pop_options
