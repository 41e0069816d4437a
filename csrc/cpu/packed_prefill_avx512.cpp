// AVX-512 dequantizer for the prefill GEMM (packed_prefill.h). Per row of W and group, a table of the row's 2^BITS
// values: the float 2^23 + q (exact, 0x4B000000 | q) minus 2^23 + z (exact: |z| < 2^15), so q - z is exact, times
// s, rounded once as ref.dequantize's (q - z) * s. Per 16 inputs the codes are shifted into the low bits of their
// lanes and looked up (vpermps); then one conversion to the output type (vcvtne2ps2bf16 / vcvtps2ph, both round
// to nearest even; bf16 flushes denormal results, which no scale within the format's clamps produces).
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>

#include "cpu/packed_prefill.h"
#include "cpu/prefetch.h"

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

// Two vectors of one row, 32 consecutive inputs: bf16 as one 64-byte store after one vcvtne2ps2bf16 (half the
// conversions and stores of one vector at a time); the other types as two full vectors.
template <DequantOut T>
inline void store_pair(void* out, int64_t idx, __m512 lo, __m512 hi) {
  if constexpr (T == DequantOut::BF16) {
    _mm512_storeu_si512(static_cast<uint16_t*>(out) + idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  } else {
    store<T>(out, idx, lo, (__mmask16)0xFFFF);
    store<T>(out, idx + 16, hi, (__mmask16)0xFFFF);
  }
}

// A tile reads each word row in a run of tile * 4 bytes, the next word row N words away: too short a run for the
// hardware prefetchers, so the words of the group two ahead are prefetched (docs/NOTES.md: 3-bit 11008 x 4096 in
// tiles of 128 rows, caches cold, 5.4-5.7 -> 4.4 ms; one group ahead 4.6, four 4.7).
constexpr int64_t kPrefetchGroups = 2;

// Rows n0 .. n0 + nt - 1 of W, each contiguous along K (out[j * ld + k]), 16 inputs of one row per vector: the
// row's word broadcast and shifted lane by lane (vpsrlvd), its 3-bit hi word rotated so that the hi bit of input
// k lands on bit 2 (vprorvd) and selected in (vpternlogd), then the table lookup: 2-bit 3 instructions per 16
// weights, 3-bit 5 (and half a broadcast of the hi word), plus half a conversion and half a store when a group is
// whole runs of 32 inputs (every group size but a per-channel group whose K is not a multiple of 32). 4-bit: the
// words of two word rows in the two halves. Loops: group, 16-row strip (its scales loaded once; the packed words
// are read along their rows, which stream, not down the columns), row, word row. The problem's fields are copied
// to locals: the stores through `out` could alias them, and GCC reloaded them every vector.
// CO: the words in the CPU word order (word_order.h), else format v1 (a compile-time choice: one loop holding both
// address forms took format v1 10% longer, M = 64, bf16 x, 3-bit).
template <int BITS, DequantOut T, bool CO>
void rows(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const int64_t N = p.N, G = p.G, K = p.K, group_len = p.group_len;
  const int32_t* const qweight = p.qweight;
  const int32_t* const qweight_hi = p.qweight_hi;
  const PlaneOrder lo = p.lo, hi = p.hi;
  const void* const scales = p.scales;
  const ScaleType scale_type = p.scale_type;
  const int16_t* const zeros = p.zeros;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // L3: 3-bit codes in the CPU word order's bits (word_order.h): input 4b + i of a word row is bits 8b + (0, 3, -,
  // 6)[i] of its word, joined (i = 3: bits 0..1 kept) or replaced (i = 2) by its nibble b of the row's hi bits
  constexpr bool L3 = CO && BITS == 3;
  const __m512i shift =
      L3 ? _mm512_setr_epi32(0, 3, 0, 6, 8, 11, 0, 14, 16, 19, 0, 22, 24, 27, 0, 30)
         : _mm512_mullo_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(kPerWord - 1)), _mm512_set1_epi32(kWidth));
  // 3-bit: the hi word holds 32 inputs; rotating right by (k % 32) - 2 puts the hi bit of input k on bit 2 (L3:
  // by 4b (i = 2: the nibble's code on bits 0..2) or 4b + 1 (i = 3: its bit 3 on bit 2), 16 more for inputs 16..31)
  const __m512i rot_lo = L3 ? _mm512_setr_epi32(0, 0, 0, 1, 0, 0, 4, 5, 0, 0, 8, 9, 0, 0, 12, 13)
                            : _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(30)), _mm512_set1_epi32(31));
  const __m512i rot_hi = _mm512_add_epi32(L3 ? rot_lo : lane, _mm512_set1_epi32(L3 ? 16 : 14));
  // the bits a code takes from its word, the rest from the hi word
  const __m512i from_word = L3 ? _mm512_setr_epi32(-1, -1, 0, 3, -1, -1, 0, 3, -1, -1, 0, 3, -1, -1, 0, 3)
                               : _mm512_set1_epi32(3);
  const __m512i magic = _mm512_set1_epi32(0x4B000000);
  const __m512 two23 = _mm512_set1_ps(8388608.0f);
  // the codes of 16 inputs of one row as vpermps indices (only bits 0..3 count; the bits above the code's own
  // may hold other codes, which the replicated table ignores): wp at their (first) word, hp at their hi word;
  // upper: inputs 16..31 of that hi word; step: from a word to the next word row's (N in format v1)
  auto codes = [&](const int32_t* wp, const int32_t* hp, bool upper, bool second_word, int64_t step)
      __attribute__((always_inline)) {
    __m512i w = _mm512_set1_epi32(*wp);
    if (BITS == 4 && second_word) w = _mm512_mask_set1_epi32(w, (__mmask16)0xFF00, wp[step]);
    const __m512i a = _mm512_srlv_epi32(w, shift);
    if constexpr (BITS == 3) {
      const __m512i h = _mm512_rorv_epi32(_mm512_set1_epi32(*hp), upper ? rot_hi : rot_lo);
      return _mm512_ternarylogic_epi32(a, h, from_word, 0xE4);  // c ? a : b
    } else {
      return a;
    }
  };
  // table entry i: the float 2^23 + (i mod 2^BITS), so (entry - (2^23 + z)) * s = (q - z) * s, exact up to the
  // one rounding of the multiply, as ref.dequantize
  const __m512 q_table = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(lane, _mm512_set1_epi32((1 << BITS) - 1)), magic));
  // word rows per 16 inputs
  constexpr int64_t kStep = BITS == 4 ? 2 : 1;
  const int scale_bytes = scale_type == ScaleType::F32 ? 4 : 2;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k_begin = g * group_len, k_end = std::min(k_begin + group_len, K);
    if (g + kPrefetchGroups < G) {  // the tile's words, scales and zeros of a group ahead, into L2
      const int64_t gp = g + kPrefetchGroups, kb = gp * group_len, ke = std::min(kb + group_len, K);
      for (int64_t r = kb / kPerWord; r < (ke + kPerWord - 1) / kPerWord; ++r)
        prefetch_lines(lo.tile_piece(qweight, r, n0, nt), nt * 4, PrefetchTo::kL2);
      if (BITS == 3)
        for (int64_t r = kb / 32; r < (ke + 31) / 32; ++r)
          prefetch_lines(hi.tile_piece(qweight_hi, r, n0, nt), nt * 4, PrefetchTo::kL2);
      prefetch_lines(static_cast<const char*>(scales) + (gp * N + n0) * scale_bytes, nt * scale_bytes,
                     PrefetchTo::kL2);
      prefetch_lines(zeros + gp * N + n0, nt * 2, PrefetchTo::kL2);
    }
    const bool pairs = (k_end - k_begin) % 32 == 0;
    for (int64_t c = 0; c < nt; c += 16) {
      const int64_t rows_here = std::min<int64_t>(16, nt - c);
      const __mmask16 m = rows_here == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows_here) - 1u);
      const __m512 s16 = load_scales(scales, scale_type, g * N + n0 + c, m);
      const __m512 zz16 = _mm512_add_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, zeros + g * N + n0 + c))), two23);
      // CPU word order: the group's first words of the strip of 16 columns a row lies in (a row of a strip is 16
      // contiguous words, so each row adds its column), found once per strip, not once per row
      const int32_t* strip_w = nullptr;
      const int32_t* strip_h = nullptr;
      int64_t strip_n = 0, strip_step = 16;
      for (int64_t jj = 0; jj < rows_here; ++jj) {
        const __m512i pick = _mm512_set1_epi32((int)jj);
        const __m512 s = _mm512_permutexvar_ps(pick, s16), zz = _mm512_permutexvar_ps(pick, zz16);
        const int64_t n = n0 + c + jj;
        const int64_t row_idx = (c + jj) * ld;
        // this row's words of the group: a word row `step` words from the last within a band of 64 inputs (N in
        // format v1, where the bands run on), the band's first word found again at each band (groups over 64)
        if (CO && (jj == 0 || (n & 15) == 0)) {
          strip_n = n;
          strip_w = qweight + lo.index(k_begin / kPerWord, n);
          if (BITS == 3) strip_h = qweight_hi + hi.index(k_begin / 32, n);
          strip_step = std::min<int64_t>(16, N - (n & ~int64_t{15}));
        }
        const int64_t step = CO ? strip_step : N;
        const int32_t* wp = CO ? strip_w + (n - strip_n) : qweight + (k_begin / kPerWord) * N + n;
        const int32_t* hp = BITS == 3 ? (CO ? strip_h + (n - strip_n) : qweight_hi + (k_begin / 32) * N + n) : nullptr;
        auto next_band = [&](int64_t k0) __attribute__((always_inline)) {
          if (!CO || k0 == k_begin || k0 % 64 != 0) return;
          wp = qweight + lo.index(k0 / kPerWord, n);
          if (BITS == 3) hp = qweight_hi + hi.index(k0 / 32, n);
        };
        // the row's 2^BITS values of the group, looked up per input (vpermps) instead of computed per input
        const __m512 table = _mm512_mul_ps(_mm512_sub_ps(q_table, zz), s);
        auto value = [&](__m512i idx) __attribute__((always_inline)) { return _mm512_permutexvar_ps(idx, table); };
        if (pairs) {
          for (int64_t k0 = k_begin; k0 < k_end; k0 += 32) {
            next_band(k0);
            const __m512 first = value(codes(wp, hp, false, true, step));
            const __m512 second = value(codes(wp + kStep * step, hp, true, true, step));
            wp += 2 * kStep * step;
            if (BITS == 3) hp += step;
            store_pair<T>(out, row_idx + k0, first, second);
          }
          continue;
        }
        // a per-channel group whose K is not a multiple of 32: 16 inputs at a time, the last ones masked
        for (int64_t k0 = k_begin; k0 < k_end; k0 += 16) {
          const bool upper = (k0 - k_begin) & 16;  // inputs 16..31 of the hi word
          next_band(k0);
          const __m512 v = value(codes(wp, hp, upper, k0 + 8 < k_end, step));
          wp += kStep * step;
          if (BITS == 3 && upper) hp += step;
          const int64_t left = k_end - k0;
          store<T>(out, row_idx + k0, v, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u));
        }
      }
    }
  }
}

template <DequantOut T>
void rows_of_type(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld) {
  switch (p.bits) {
    case 2: return p.lo.band > 1 ? rows<2, T, true>(p, n0, nt, out, ld) : rows<2, T, false>(p, n0, nt, out, ld);
    case 3: return p.lo.band > 1 ? rows<3, T, true>(p, n0, nt, out, ld) : rows<3, T, false>(p, n0, nt, out, ld);
    default: return p.lo.band > 1 ? rows<4, T, true>(p, n0, nt, out, ld) : rows<4, T, false>(p, n0, nt, out, ld);
  }
}

}  // namespace

void dequantize_rows_avx512(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                            DequantOut type) {
  switch (type) {
    case DequantOut::F32: rows_of_type<DequantOut::F32>(p, n0, nt, out, ld); break;
    case DequantOut::F16: rows_of_type<DequantOut::F16>(p, n0, nt, out, ld); break;
    case DequantOut::BF16: rows_of_type<DequantOut::BF16>(p, n0, nt, out, ld); break;
  }
}

}  // namespace saliq

#pragma GCC pop_options
