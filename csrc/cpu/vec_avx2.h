// 8-lane vector traits (AVX2 + FMA + F16C) shared by the AVX2 kernels: the FMA kernel (packed_gemv_fma.h) uses
// them as they are, the integer-dot-product one (packed_gemv_int8.h) adds its own. Include it only after the
// file's `#pragma GCC target("avx2,fma,f16c")`.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "cpu/packed_gemv.h"

namespace {

struct VecAvx2 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static I zero_i() { return _mm256_setzero_si256(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1_i(int v) { return _mm256_set1_epi32(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I srl(I a, int s) { return _mm256_srli_epi32(a, s); }
  static I sll(I a, int s) { return _mm256_slli_epi32(a, s); }
  static I and_i(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_i(I a, I b) { return _mm256_or_si256(a, b); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F load_zeros(const int16_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_scales(const void* base, saliq::ScaleType type, int64_t idx) {
    if (type == saliq::ScaleType::F32) return _mm256_loadu_ps(static_cast<const float*>(base) + idx);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + idx));
    if (type == saliq::ScaleType::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};

}  // namespace
