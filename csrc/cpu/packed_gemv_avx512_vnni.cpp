// AVX-512 VNNI integer-dot-product GEMV (packed_gemv_int8.h): one vpdpbusd per 4 inputs x 16 columns x digit.
// Blocks: 64 columns for M = 1 (4 words of each row in flight), 32 columns in 4-row tiles for M > 1.
// Called only when the CPU has AVX512_VNNI and AVX512_VBMI and the AVX-512 path is active (packed_gemv_portable.cpp).
#include <immintrin.h>
#include <algorithm>
#include <stdint.h>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")

namespace {

struct VecVnni512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kAccumulators = 18;  // of 32 zmm (tiles: 4 rows x 2 digits x 2, 3 x 3 x 2)
  static F zero() { return _mm512_setzero_ps(); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int v) { return _mm512_set1_epi32(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void prefetch(const int32_t* p, int vectors) {
    for (int v = 0; v < vectors; ++v) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * v), _MM_HINT_T0);
  }
  static I srl(I a, int s) { return _mm512_srli_epi32(a, s); }
  static I and_i(I a, I b) { return _mm512_and_si512(a, b); }
  static constexpr bool kInt16Sums = false;  // vpdpbusd sums into int32 itself
  static I dot(I acc, I codes, I x) { return _mm512_dpbusd_epi32(acc, codes, x); }
  static I select(I mask, I a, I b) { return _mm512_ternarylogic_epi32(a, b, mask, 0xE4); }  // mask ? a : b
  // 3-bit: byte b of column word c of the result = bits 16 half + 4b - 2 .. + 5 of hi word c (vpmultishiftqb
  // takes 8 bits at any offset of the qword holding two columns), so bits 2..5 are the hi bits of k = 4b..4b+3
  // of the word row; the bits around them are removed after each shift.
  static I code3(I w, I hx, int j, I mask, I code3) {  // bits 0-1 from the lo word, bit 2 from the spread hi word
    return and_i(select(mask, srl(w, 2 * j), srl(hx, j)), code3);
  }
  static I spread_hi(I h, int half) {
    return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(half ? 0x3A36322E1A16120ELL : 0x2A26221E0A06023ELL), h);
  }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F load_zeros(const int16_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static F load_scales(const void* base, saliq::ScaleType type, int64_t idx) {
    if (type == saliq::ScaleType::F32) return _mm512_loadu_ps(static_cast<const float*>(base) + idx);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + idx));
    if (type == saliq::ScaleType::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

int64_t int8x512_width(const PackedGemvProblem& p) { return p.M == 1 ? 64 : 32; }

void int8x512_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni512, 4, 2, 4>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
