// AVX-512 small-M packed matmul.
// M <= 4, 2- and 3-bit: table lookup instead of unpack-and-multiply, one row of x at a time. For each
// pair of inputs (k, k+1) a 16-entry table T[c0 + 4 c1] = c0 x[k] + c1 x[k+1] is built once per call; a
// packed 2-bit word shifted right by 4j holds the pair's two codes in its low 4 bits, which is exactly the
// index vpermps reads, so one shift + one permute + one add handle 2 inputs x 16 columns (exact fp32 products, fp32
// sums). 3-bit reads the CPU word order's layout (word_order.h: byte b of a word holds codes 4b, 4b + 1 and the low
// bits of 4b + 3, nibble b of the row's hi bits code 4b + 2 and 4b + 3's third bit): per 4 inputs three 16-entry
// tables, c0 x0 + (c1 & 1) x1 indexed by the byte's low nibble, 2 (c1 >> 1) x1 + (c3 & 3) x3 by its high nibble,
// c2 x2 + 4 (c3 >> 2) x3 by the hi nibble: 12 lookups a word row, as format v1's 8 pairs and 4 hi quads were, and
// tables of the same size; format v1's words are re-packed into that layout first (rare: a QuantLinear on the CPU
// keeps the CPU word order), so both give the same bits.
// Other cases: bf16 activations on AVX512_BF16 CPUs -> packed_gemv_avx512_bf16.cpp; else the shared FMA
// kernel (packed_gemv_fma.h) over 16-lane vectors.
// Work split: blocks of 64 columns (LUT) or 32 columns (FMA); the plan in packed_gemv_portable.cpp hands
// them to threads (each block is computed by one thread, so results do not depend on the schedule).
#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include "cpu/vec_avx512.h"
#include "cpu/packed_gemv_fma.h"

namespace {

constexpr int kLutVectors = 4;  // 64 columns per block
constexpr int64_t kPrefetchRows = 16;  // ~1.5 us of work ahead (measured: 8 to 32 all within 5%)

// 2-bit: [k_padded / 2][16] pair tables. 3-bit: per 4 inputs the three 16-entry tables of the CPU word order's
// layout (the top of this file).
constexpr int64_t kQuad3 = 48;

void build_tables(const float* x, int64_t k_padded, int bits, float* tables) {
  if (bits == 2) {
    for (int64_t pr = 0; pr < k_padded / 2; ++pr) {
      const float x0 = x[2 * pr], x1 = x[2 * pr + 1];
      for (int c = 0; c < 16; ++c) tables[pr * 16 + c] = (float)(c & 3) * x0 + (float)(c >> 2) * x1;
    }
    return;
  }
  for (int64_t qd = 0; qd < k_padded / 4; ++qd) {
    const float x0 = x[4 * qd], x1 = x[4 * qd + 1], x2 = x[4 * qd + 2], x3 = x[4 * qd + 3];
    float* t = tables + qd * kQuad3;
    for (int i = 0; i < 16; ++i) {
      t[i] = (float)(i & 7) * x0 + (float)(i >> 3) * x1;                // c0 | (c1 & 1) << 3
      t[16 + i] = (float)(2 * (i & 3)) * x1 + (float)(i >> 2) * x3;     // c1 >> 1 | (c3 & 3) << 2
      t[32 + i] = (float)(i & 7) * x2 + (float)(4 * (i >> 3)) * x3;     // c2 | (c3 >> 2) << 3
    }
  }
}

// One row of x over 64 columns: per word row, 2-bit 8 pair lookups, 3-bit 12 (the top of this file), into two add
// chains per vector. CO (3-bit): the words in the CPU word order; else format v1's, re-packed per word row into the
// CPU word order's layout (word_order.h) first.
template <int BITS, bool CO = true>
void lut_block(const saliq::PackedGemvProblem& p, int64_t n0, const float* tables) {
  using U32x16 = uint32_t __attribute__((vector_size(64)));  // word_order.h's conversion on 16 lanes
  constexpr int NV = kLutVectors;
  __m512 yacc[NV];
  for (int v = 0; v < NV; ++v) yacc[v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc[2][NV];
    for (int v = 0; v < NV; ++v) acc[0][v] = acc[1][v] = _mm512_setzero_ps();
    const int64_t r_begin = g * p.group_len / 16;
    const int64_t r_end = ((g + 1) * p.group_len + 15) / 16;
    for (int64_t r = r_begin; r < r_end; ++r) {
      // In format v1 the block's word rows lie N words apart, a stride the hardware prefetcher follows poorly
      // when the weights come from DRAM (decode of a whole model): fetch kPrefetchRows rows ahead ourselves.
      if (r + kPrefetchRows < (p.K + 15) / 16) {
        const char* ahead = reinterpret_cast<const char*>(p.lo.tile_piece(p.qweight, r + kPrefetchRows, n0, NV * 16));
        for (int v = 0; v < NV; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
      }
      __m512i w[NV];
      const saliq::PlaneOrder::Row wrow = p.lo.row(p.qweight, r);
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(wrow.at(n0 + v * 16));
      if constexpr (BITS == 2) {
        const float* t = tables + r * 8 * 16;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m512 table = _mm512_loadu_ps(t + j * 16);
          for (int v = 0; v < NV; ++v)  // even j into acc[0], odd j into acc[1]
            acc[j & 1][v] = _mm512_add_ps(acc[j & 1][v], _mm512_permutexvar_ps(_mm512_srli_epi32(w[v], 4 * j), table));
        }
      } else {
        __m512i h[NV];
        const saliq::PlaneOrder::Row hrow = p.hi.row(p.qweight_hi, r >> 1);
        for (int v = 0; v < NV; ++v) {
          h[v] = _mm512_srli_epi32(_mm512_loadu_si512(hrow.at(n0 + v * 16)), 16 * (int)(r & 1));
          if (!CO) {
            U32x16 wv = (U32x16)w[v], hv = (U32x16)h[v];
            saliq::cpu3_from_v1(wv, hv, &wv, &hv);
            w[v] = (__m512i)wv;
            h[v] = (__m512i)hv;
          }
        }
        const float* t = tables + r * 4 * kQuad3;
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) {
          const __m512 t1 = _mm512_loadu_ps(t + b * kQuad3), t2 = _mm512_loadu_ps(t + b * kQuad3 + 16);
          const __m512 t3 = _mm512_loadu_ps(t + b * kQuad3 + 32);
          for (int v = 0; v < NV; ++v) {
            acc[0][v] = _mm512_add_ps(acc[0][v], _mm512_permutexvar_ps(_mm512_srli_epi32(w[v], 8 * b), t1));
            acc[1][v] = _mm512_add_ps(acc[1][v], _mm512_permutexvar_ps(_mm512_srli_epi32(w[v], 8 * b + 4), t2));
            acc[b & 1][v] = _mm512_add_ps(acc[b & 1][v], _mm512_permutexvar_ps(_mm512_srli_epi32(h[v], 4 * b), t3));
            // each vector's sums in order: GCC otherwise issued a row's lookups first and spilled their results
            // (M = 1, 4096 x 11008, weights in cache: 2.2-2.5 ms against 0.72-0.78)
            __asm__("" : "+v"(acc[0][v]), "+v"(acc[1][v]));
          }
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t idx = g * p.N + n0 + v * 16;
      const __m512 s = VecAvx512::load_scales(p.scales, p.scale_type, idx);
      const __m512 z = VecAvx512::load_zeros(p.zeros + idx);
      const __m512 xs = _mm512_set1_ps(p.x_group_sum[g]);
      yacc[v] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, _mm512_add_ps(acc[0][v], acc[1][v])), yacc[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 b = p.bias ? _mm512_loadu_ps(p.bias + n0 + v * 16) : _mm512_setzero_ps();
    _mm512_storeu_ps(p.y + n0 + v * 16, _mm512_add_ps(yacc[v], b));
  }
}

}  // namespace

namespace saliq {

int64_t lut_table_floats(const PackedGemvProblem& p) {
  return p.bits == 3 ? p.k_padded / 4 * kQuad3 : p.k_padded / 2 * 16;
}

void lut_tables(const PackedGemvProblem& p, float* tables) {
  const int64_t per_row = lut_table_floats(p);
  for (int64_t m = 0; m < p.M; ++m) build_tables(p.x + m * p.k_padded, p.k_padded, p.bits, tables + m * per_row);
}

// The table lookup serves one row of x at a time (for M <= 4 it beats the shared-unpack FMA kernel even though
// it streams the weights once per row; measured, docs/NOTES.md).
void lut_columns(const PackedGemvProblem& p, const float* tables, int64_t n0) {
  const int64_t per_row = lut_table_floats(p);
  for (int64_t m = 0; m < p.M; ++m) {
    PackedGemvProblem row = p;
    row.M = 1;
    row.x = p.x + m * p.k_padded;
    row.x_group_sum = p.x_group_sum + m * p.G;
    row.y = p.y + m * p.N;
    const float* t = tables + m * per_row;
    if (p.bits == 2) lut_block<2>(row, n0, t);
    else if (p.lo.band > 1) lut_block<3>(row, n0, t);
    else lut_block<3, false>(row, n0, t);
  }
}

void fma512_columns(const PackedGemvProblem& p, int64_t n0) { fma_columns_any_bits<VecAvx512, 2>(p, n0); }

}  // namespace saliq

#pragma GCC pop_options
