// 16-lane vector traits (AVX-512 F/BW/VL + F16C) shared by the AVX-512 kernels: the FMA kernel
// (packed_gemv_fma.h) uses them as they are, the VNNI one (packed_gemv_int8.h) adds its own. Include it only after
// the file's `#pragma GCC target` (at least "avx512f,avx512bw,avx512vl,avx2,fma,f16c").
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "cpu/packed_gemv.h"

namespace {

struct VecAvx512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int v) { return _mm512_set1_epi32(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I srl(I a, int s) { return _mm512_srli_epi32(a, s); }
  static I sll(I a, int s) { return _mm512_slli_epi32(a, s); }
  static I and_i(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_i(I a, I b) { return _mm512_or_si512(a, b); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
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
