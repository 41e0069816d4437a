// AVX-512 small-M packed matmul.
// M <= 4, 2- and 3-bit: table lookup instead of unpack-and-multiply, one row of x at a time. For each
// pair of inputs (k, k+1) a 16-entry table T[c0 + 4 c1] = c0 x[k] + c1 x[k+1] is built once per call; a
// packed 2-bit word shifted right by 4j holds the pair's two codes in its low 4 bits, which is exactly the
// index vpermps reads, so one shift + one permute + one add handle 2 inputs x 16 columns (exact fp32 products, fp32 sums). The
// 3-bit plane adds, per 4 inputs, a table of 4 (sum of bit_i x[k+i]) indexed by 4 bits of the hi word.
// Other cases: bf16 activations on AVX512_BF16 CPUs -> packed_gemv_avx512_bf16.cpp; else the shared FMA
// kernel (packed_gemv_fma.h) over 16-lane vectors.
// Work split: blocks of 64 columns (LUT) or 32 columns (FMA); the plan in packed_gemv_portable.cpp hands
// them to threads (each block is computed by one thread, so results do not depend on the schedule).
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include "cpu/vec_avx512.h"
#include "cpu/packed_gemv_fma.h"

namespace {

constexpr int kLutVectors = 4;  // 64 columns per block
constexpr int64_t kPrefetchRows = 16;  // ~1.5 us of work ahead (measured: 8 to 32 all within 5%)

// pair_tables: [k_padded / 2][16]; hi_tables (3-bit): [k_padded / 4][16] (entries past 15 unused).
void build_tables(const float* x, int64_t k_padded, int bits, float* pair_tables, float* hi_tables) {
  for (int64_t pr = 0; pr < k_padded / 2; ++pr) {
    const float x0 = x[2 * pr], x1 = x[2 * pr + 1];
    for (int c = 0; c < 16; ++c) pair_tables[pr * 16 + c] = (float)(c & 3) * x0 + (float)(c >> 2) * x1;
  }
  if (bits != 3) return;
  for (int64_t qd = 0; qd < k_padded / 4; ++qd) {
    const float* xq = x + 4 * qd;
    for (int c = 0; c < 16; ++c) {
      float v = 0.0f;
      for (int i = 0; i < 4; ++i)
        if (c & (1 << i)) v += xq[i];
      hi_tables[qd * 16 + c] = 4.0f * v;
    }
  }
}

inline __m512i splat(uint32_t v) { return _mm512_set1_epi32((int)v); }

// word_order.h's cpu3_to_v1 on 16 columns: a word row's words and its 16 hi bits (the low half of h) in the CPU
// word order's 3-bit layout -> format v1's (the hi bits in the low half)
inline void cpu3_to_v1_x16(__m512i w, __m512i h, __m512i* w_out, __m512i* h_out) {
  // vpternlogd immediates: 0xA8 = (a | b) & c, 0xCA = a ? b : c (bitwise)
  h = _mm512_and_si512(h, splat(0xFFFF));
  __m512i s = _mm512_ternarylogic_epi32(h, _mm512_slli_epi32(h, 8), splat(0x00FF00FF), 0xA8);
  s = _mm512_ternarylogic_epi32(s, _mm512_slli_epi32(s, 4), splat(0x0F0F0F0F), 0xA8);  // nibble b -> byte b
  const __m512i t = _mm512_ternarylogic_epi32(splat(0xC3C3C3C3), w, _mm512_srli_epi32(w, 1), 0xCA);
  *w_out = _mm512_ternarylogic_epi32(splat(0xCFCFCFCF), t, _mm512_slli_epi32(s, 4), 0xCA);
  __m512i u = _mm512_and_si512(
      _mm512_ternarylogic_epi32(splat(0x01010101), _mm512_srli_epi32(w, 2), _mm512_srli_epi32(w, 4), 0xCA),
      splat(0x03030303));  // v1's hi bits of codes 4b, 4b + 1 in bits 0, 1 of byte b
  u = _mm512_ternarylogic_epi32(u, _mm512_srli_epi32(u, 4), splat(0x00FF00FF), 0xA8);
  u = _mm512_ternarylogic_epi32(u, _mm512_srli_epi32(u, 8), splat(0xFFFF), 0xA8);  // byte b -> nibble b
  *h_out = _mm512_ternarylogic_epi32(splat(0xCCCC), h, u, 0xCA);
}

// L3: 3-bit codes in the CPU word order's bits (word_order.h), put back in format v1's bits kBufRows word rows at
// a time into a buffer in L1, so that the lookups and their sums are those of format v1, bit for bit (converted in
// registers between the lookups instead, the conversion's constants and the next row's words spilled: 1.2x slower)
constexpr int64_t kBufRows = 8;

template <int BITS, bool L3 = false>
void lut_block(const saliq::PackedGemvProblem& p, int64_t n0, const float* pair_tables, const float* hi_tables) {
  constexpr int NV = kLutVectors;
  __m512 yacc[NV];
  for (int v = 0; v < NV; ++v) yacc[v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc[NV], acc_b[NV];
    for (int v = 0; v < NV; ++v) acc[v] = acc_b[v] = _mm512_setzero_ps();
    const int64_t r_begin = g * p.group_len / 16;
    const int64_t r_end = ((g + 1) * p.group_len + 15) / 16;
    alignas(64) int32_t buf_lo[L3 ? kBufRows : 1][NV * 16], buf_hi[L3 ? kBufRows / 2 : 1][NV * 16];
    int64_t buf_r0 = r_begin;  // the first word row in the buffers
    for (int64_t r = r_begin; r < r_end; ++r) {
      // In format v1 the block's word rows lie N words apart, a stride the hardware prefetcher follows poorly
      // when the weights come from DRAM (decode of a whole model): fetch kPrefetchRows rows ahead ourselves.
      if (r + kPrefetchRows < (p.K + 15) / 16) {
        const char* ahead = reinterpret_cast<const char*>(p.lo.tile_piece(p.qweight, r + kPrefetchRows, n0, NV * 16));
        for (int v = 0; v < NV; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
      }
      __m512i w[NV];
      const saliq::PlaneOrder::Row wrow = p.lo.row(p.qweight, r);
      if constexpr (L3) {
        if ((r - r_begin) % kBufRows == 0) {  // the next rows of the group (a pair per hi word, the second zero past
          buf_r0 = r;                          // the group) in format v1's bits
          for (int64_t q = r; q < std::min(r_end, r + kBufRows); q += 2) {
            const saliq::PlaneOrder::Row a = p.lo.row(p.qweight, q), b = p.lo.row(p.qweight, q + 1),
                                         hr = p.hi.row(p.qweight_hi, q >> 1);
            for (int v = 0; v < NV; ++v) {
              const __m512i h = _mm512_loadu_si512(hr.at(n0 + v * 16));
              const __m512i wb = q + 1 < r_end ? _mm512_loadu_si512(b.at(n0 + v * 16)) : _mm512_setzero_si512();
              __m512i w0, w1, h0, h1;
              cpu3_to_v1_x16(_mm512_loadu_si512(a.at(n0 + v * 16)), h, &w0, &h0);
              cpu3_to_v1_x16(wb, _mm512_srli_epi32(h, 16), &w1, &h1);
              _mm512_store_si512(buf_lo[q - r] + v * 16, w0);
              _mm512_store_si512(buf_lo[q - r + 1] + v * 16, w1);
              _mm512_store_si512(buf_hi[(q - r) / 2] + v * 16, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)));
            }
          }
        }
        for (int v = 0; v < NV; ++v) w[v] = _mm512_load_si512(buf_lo[r - buf_r0] + v * 16);
      } else {
        for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(wrow.at(n0 + v * 16));
      }
      const float* t = pair_tables + r * 8 * 16;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512 table = _mm512_loadu_ps(t + j * 16);
        for (int v = 0; v < NV; ++v) {
          // even j into acc, odd j into acc_b: two independent add chains per vector
          const __m512 val = _mm512_permutexvar_ps(_mm512_srli_epi32(w[v], 4 * j), table);
          if (j & 1) acc_b[v] = _mm512_add_ps(acc_b[v], val);
          else acc[v] = _mm512_add_ps(acc[v], val);
        }
      }
      if (BITS == 3 && (r & 1) == 0) {  // one hi word covers two 2-bit word rows (32 inputs)
        const int64_t r_hi = r >> 1;
        const int64_t quads = (r + 1 < r_end) ? 8 : 4;
        __m512i h[NV];
        const saliq::PlaneOrder::Row hrow = p.hi.row(p.qweight_hi, r_hi);
        for (int v = 0; v < NV; ++v)
          h[v] = L3 ? _mm512_load_si512(buf_hi[(r - buf_r0) / 2] + v * 16) : _mm512_loadu_si512(hrow.at(n0 + v * 16));
        const float* th = hi_tables + r_hi * 8 * 16;
        for (int j = 0; j < quads; ++j) {
          const __m512 table = _mm512_loadu_ps(th + j * 16);
          for (int v = 0; v < NV; ++v) {
            const __m512 val = _mm512_permutexvar_ps(_mm512_srli_epi32(h[v], 4 * j), table);
            if (j & 1) acc_b[v] = _mm512_add_ps(acc_b[v], val);
            else acc[v] = _mm512_add_ps(acc[v], val);
          }
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t idx = g * p.N + n0 + v * 16;
      const __m512 s = VecAvx512::load_scales(p.scales, p.scale_type, idx);
      const __m512 z = VecAvx512::load_zeros(p.zeros + idx);
      const __m512 xs = _mm512_set1_ps(p.x_group_sum[g]);
      yacc[v] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, _mm512_add_ps(acc[v], acc_b[v])), yacc[v]);
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
  return p.k_padded / 2 * 16 + (p.bits == 3 ? p.k_padded / 4 * 16 : 0);
}

void lut_tables(const PackedGemvProblem& p, float* tables) {
  const int64_t per_row = lut_table_floats(p);
  for (int64_t m = 0; m < p.M; ++m) {
    float* t = tables + m * per_row;
    build_tables(p.x + m * p.k_padded, p.k_padded, p.bits, t, t + p.k_padded / 2 * 16);
  }
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
    if (p.bits == 3 && p.lo.band > 1) lut_block<3, true>(row, n0, t, t + p.k_padded / 2 * 16);
    else if (p.bits == 3) lut_block<3>(row, n0, t, t + p.k_padded / 2 * 16);
    else lut_block<2>(row, n0, t, nullptr);
  }
}

void fma512_columns(const PackedGemvProblem& p, int64_t n0) { fma_columns_any_bits<VecAvx512, 2>(p, n0); }

}  // namespace saliq

#pragma GCC pop_options
