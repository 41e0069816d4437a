// half_to_float.h: F16C conversion on the AVX2 and AVX-512 paths, c10's bit arithmetic elsewhere.
#include "cpu/half_to_float.h"

#include <immintrin.h>

#include "cpu/cpu_features.h"

namespace saliq {
namespace {

__attribute__((target("avx512f"))) void halves_to_floats_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}

__attribute__((target("avx2,f16c"))) void halves_to_floats_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}

}  // namespace

void halves_to_floats(const uint16_t* src, float* dst, int64_t n) {
  switch (active_isa()) {
    case CpuIsa::Avx512: halves_to_floats_avx512(src, dst, n); return;
    case CpuIsa::Avx2: halves_to_floats_f16c(src, dst, n); return;
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
  }
}

}  // namespace saliq
