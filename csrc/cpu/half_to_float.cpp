// half_to_float.h: F16C conversion on the AVX2 and AVX-512 paths, c10's bit arithmetic elsewhere.
#include "cpu/half_to_float.h"

#include <immintrin.h>

#include "cpu/cpu_features.h"

namespace saliq {
namespace {

// c10's portable fp16 -> fp32 (fp16_ieee_to_fp32_value)
float half_bits_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = __builtin_bit_cast(float, (two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = __builtin_bit_cast(float, (two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? __builtin_bit_cast(uint32_t, subnormal) : __builtin_bit_cast(uint32_t, normalized);
  return __builtin_bit_cast(float, sign | magnitude);
}

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
