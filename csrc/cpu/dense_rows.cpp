// dense_rows.h: one kernel per ISA path (AVX-512, AVX2 + FMA + F16C, portable), a row at a time.
#include "cpu/dense_rows.h"

#include <immintrin.h>

#include "cpu/cpu_features.h"
#include "cpu/half_to_float.h"

namespace saliq {
namespace {

template <DenseType TY>
float element(const void* A, int64_t i) {
  if constexpr (TY == DenseType::F32) return static_cast<const float*>(A)[i];
  const uint16_t bits = static_cast<const uint16_t*>(A)[i];
  if constexpr (TY == DenseType::BF16) return __builtin_bit_cast(float, (uint32_t)bits << 16);
  return half_bits_to_float(bits);
}

// The row's sum, scaled, stored or added into t
template <bool ACC>
inline void put(float* t, float scale, float sum) {
  if constexpr (ACC) *t += scale * sum;
  else *t = scale * sum;
}

// Portable, and the rows shorter than a vector on every path: per row one running sum in k order.
template <DenseType TY, bool ACC>
void rows_portable(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale,
                   int64_t j0, int64_t j1, float* t) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += element<TY>(A, j * K + k) * x[m * ldx + k];
      put<ACC>(t + m * ldt + j, scale, acc);
    }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

// 16 elements of A from index i, widened to fp32; `mask` selects the ones to read (the rest are zero)
template <DenseType TY>
inline __m512 load16(const void* A, int64_t i, __mmask16 mask) {
  if constexpr (TY == DenseType::F32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(A) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(A) + i);
  if constexpr (TY == DenseType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Row j against every row of x: four accumulators in turn over blocks of 16 (four FMA chains), then the masked tail.
template <DenseType TY, bool ACC>
void row_avx512(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale, int64_t j,
                float* t) {
  const int64_t whole = K & ~int64_t{63}, sixteens = K & ~int64_t{15};
  const __mmask16 tail = (__mmask16)((1u << (K - sixteens)) - 1u);
  const int64_t row = j * K;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < whole; k += 64)
      for (int q = 0; q < 4; ++q)
        acc[q] = _mm512_fmadd_ps(load16<TY>(A, row + k + 16 * q, 0xFFFF), _mm512_loadu_ps(xm + k + 16 * q), acc[q]);
    for (int64_t k = whole, q = 0; k < sixteens; k += 16, ++q)
      acc[q] = _mm512_fmadd_ps(load16<TY>(A, row + k, 0xFFFF), _mm512_loadu_ps(xm + k), acc[q]);
    if (tail)
      acc[0] = _mm512_fmadd_ps(load16<TY>(A, row + sixteens, tail), _mm512_maskz_loadu_ps(tail, xm + sixteens), acc[0]);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    put<ACC>(t + m * ldt + j, scale, _mm512_reduce_add_ps(sum));
  }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <DenseType TY>
inline __m256 load8(const void* A, int64_t i) {
  if constexpr (TY == DenseType::F32) return _mm256_loadu_ps(static_cast<const float*>(A) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(A) + i));
  if constexpr (TY == DenseType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <DenseType TY, bool ACC>
void row_avx2(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale, int64_t j,
              float* t) {
  const int64_t whole = K & ~int64_t{31}, eights = K & ~int64_t{7};
  const int64_t row = j * K;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < whole; k += 32)
      for (int q = 0; q < 4; ++q)
        acc[q] = _mm256_fmadd_ps(load8<TY>(A, row + k + 8 * q), _mm256_loadu_ps(xm + k + 8 * q), acc[q]);
    for (int64_t k = whole, q = 0; k < eights; k += 8, ++q)
      acc[q] = _mm256_fmadd_ps(load8<TY>(A, row + k), _mm256_loadu_ps(xm + k), acc[q]);
    float s = sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (int64_t k = eights; k < K; ++k) s += element<TY>(A, row + k) * xm[k];
    put<ACC>(t + m * ldt + j, scale, s);
  }
}

#pragma GCC pop_options

template <DenseType TY, bool ACC>
void rows_of_type(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale,
                  int64_t j0, int64_t j1, float* t) {
  const CpuIsa isa = active_isa();
  if (isa == CpuIsa::Avx512 && K >= 16) {
    for (int64_t j = j0; j < j1; ++j) row_avx512<TY, ACC>(x, M, ldx, A, K, ldt, scale, j, t);
  } else if (isa == CpuIsa::Avx2 && K >= 8) {
    for (int64_t j = j0; j < j1; ++j) row_avx2<TY, ACC>(x, M, ldx, A, K, ldt, scale, j, t);
  } else {
    rows_portable<TY, ACC>(x, M, ldx, A, K, ldt, scale, j0, j1, t);
  }
}

template <DenseType TY>
void rows_of_type(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale,
                  int64_t j0, int64_t j1, float* t, bool accumulate) {
  if (accumulate) rows_of_type<TY, true>(x, M, ldx, A, K, ldt, scale, j0, j1, t);
  else rows_of_type<TY, false>(x, M, ldx, A, K, ldt, scale, j0, j1, t);
}

}  // namespace

void dense_rows(const float* x, int64_t M, int64_t ldx, const void* A, DenseType type, int64_t K, int64_t ldt,
                float scale, int64_t j0, int64_t j1, float* t, bool accumulate) {
  switch (type) {
    case DenseType::BF16: rows_of_type<DenseType::BF16>(x, M, ldx, A, K, ldt, scale, j0, j1, t, accumulate); return;
    case DenseType::F16: rows_of_type<DenseType::F16>(x, M, ldx, A, K, ldt, scale, j0, j1, t, accumulate); return;
    default: rows_of_type<DenseType::F32>(x, M, ldx, A, K, ldt, scale, j0, j1, t, accumulate);
  }
}

}  // namespace saliq
