// dense_rows.h: one kernel per ISA path (AVX-512, AVX2 + FMA + F16C, portable), a row at a time.
#include "cpu/dense_rows.h"

#include <immintrin.h>

#include <algorithm>

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
// GCC 12's AVX-512 intrinsics build on _mm*_undefined_*, which -Wuninitialized reports wherever they are inlined
// (GCC bug 105593, fixed in 13): here _mm512_reduce_add_ps, since rows of x are taken together
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// 16 elements of A from index i, widened to fp32; `mask` selects the ones to read (the rest are zero)
template <DenseType TY>
inline __m512 load16(const void* A, int64_t i, __mmask16 mask) {
  if constexpr (TY == DenseType::F32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(A) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(A) + i);
  if constexpr (TY == DenseType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Row j against rows m0 .. m0 + MT - 1 of x: per row of x four accumulators in turn over blocks of 16 (four FMA
// chains), then the masked tail; each block of A is loaded and widened once for the MT rows (the demo's LM head,
// 49152 x 576 fp32 at M = 4, one thread: 4.7-5.2 -> 4.0-4.2 ms, docs/NOTES.md). Every (j, m) sums in the same order
// whatever MT is, so a row of x gets the same bits alone or in a batch.
template <DenseType TY, bool ACC, int MT>
void row_avx512(const float* x, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale, int64_t j, int64_t m0,
                float* t) {
  const int64_t whole = K & ~int64_t{63}, sixteens = K & ~int64_t{15};
  const __mmask16 tail = (__mmask16)((1u << (K - sixteens)) - 1u);
  const int64_t row = j * K;
  const float* xm[MT];
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m) {
    xm[m] = x + (m0 + m) * ldx;
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < whole; k += 64)
    for (int q = 0; q < 4; ++q) {
      const __m512 a = load16<TY>(A, row + k + 16 * q, 0xFFFF);
      for (int m = 0; m < MT; ++m) acc[m][q] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xm[m] + k + 16 * q), acc[m][q]);
    }
  // the last whole blocks (at most 3), each into its own chain; q a constant, so acc stays in registers
#pragma GCC unroll 3
  for (int q = 0; q < 3; ++q) {
    const int64_t k = whole + 16 * q;
    if (k >= sixteens) break;
    const __m512 a = load16<TY>(A, row + k, 0xFFFF);
    for (int m = 0; m < MT; ++m) acc[m][q] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xm[m] + k), acc[m][q]);
  }
  if (tail) {
    const __m512 a = load16<TY>(A, row + sixteens, tail);
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(tail, xm[m] + sixteens), acc[m][0]);
  }
  for (int m = 0; m < MT; ++m) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
    put<ACC>(t + (m0 + m) * ldt + j, scale, _mm512_reduce_add_ps(sum));
  }
}

#pragma GCC diagnostic pop
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

// As row_avx512 on 8 lanes; at most two rows of x at once (16 ymm registers: 8 accumulators, A, x, sums)
template <DenseType TY, bool ACC, int MT>
void row_avx2(const float* x, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale, int64_t j, int64_t m0,
              float* t) {
  const int64_t whole = K & ~int64_t{31}, eights = K & ~int64_t{7};
  const int64_t row = j * K;
  const float* xm[MT];
  __m256 acc[MT][4];
  for (int m = 0; m < MT; ++m) {
    xm[m] = x + (m0 + m) * ldx;
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < whole; k += 32)
    for (int q = 0; q < 4; ++q) {
      const __m256 a = load8<TY>(A, row + k + 8 * q);
      for (int m = 0; m < MT; ++m) acc[m][q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xm[m] + k + 8 * q), acc[m][q]);
    }
#pragma GCC unroll 3
  for (int q = 0; q < 3; ++q) {  // the last whole blocks (at most 3): q a constant, acc in registers
    const int64_t k = whole + 8 * q;
    if (k >= eights) break;
    const __m256 a = load8<TY>(A, row + k);
    for (int m = 0; m < MT; ++m) acc[m][q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xm[m] + k), acc[m][q]);
  }
  for (int m = 0; m < MT; ++m) {
    float s = sum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
    for (int64_t k = eights; k < K; ++k) s += element<TY>(A, row + k) * xm[m][k];
    put<ACC>(t + (m0 + m) * ldt + j, scale, s);
  }
}

#pragma GCC pop_options

template <DenseType TY, bool ACC>
void rows_of_type(const float* x, int64_t M, int64_t ldx, const void* A, int64_t K, int64_t ldt, float scale,
                  int64_t j0, int64_t j1, float* t) {
  const CpuIsa isa = active_isa();
  // rows of x side by side only while they fit in 16 KB of L1 next to A's stream: with 4 rows of K = 4096 (64 KB) a
  // 4096 x 4096 fp32 GEMV at M = 4 took twice as long as row by row
  const int64_t fit = std::max<int64_t>(1, (16 << 10) / (K * (int64_t)sizeof(float)));
  if (isa == CpuIsa::Avx512 && K >= 16) {
    const int64_t step = std::min<int64_t>(4, fit);
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t m = 0; m < M; m += step) switch (std::min(step, M - m)) {
          case 4: row_avx512<TY, ACC, 4>(x, ldx, A, K, ldt, scale, j, m, t); break;
          case 3: row_avx512<TY, ACC, 3>(x, ldx, A, K, ldt, scale, j, m, t); break;
          case 2: row_avx512<TY, ACC, 2>(x, ldx, A, K, ldt, scale, j, m, t); break;
          default: row_avx512<TY, ACC, 1>(x, ldx, A, K, ldt, scale, j, m, t);
        }
  } else if (isa == CpuIsa::Avx2 && K >= 8) {
    const int64_t step = std::min<int64_t>(2, fit);
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t m = 0; m < M; m += step) {
        if (step == 2 && m + 2 <= M) row_avx2<TY, ACC, 2>(x, ldx, A, K, ldt, scale, j, m, t);
        else row_avx2<TY, ACC, 1>(x, ldx, A, K, ldt, scale, j, m, t);
      }
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
