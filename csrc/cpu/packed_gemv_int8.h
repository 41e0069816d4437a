// Small-M packed matmul on integer dot products, written once over a vector-traits type V (AVX-512 VNNI: one
// vpdpbusd; AVX2: vpmaddubsw + vpaddw, int16 sums). Include it only after the file's `#pragma GCC target`.
//
// Why: the exact kernels convert every code to fp32 (or look it up) before multiplying, ~2 instructions per
// code and 16 columns, which on a 2-core Zen 4 reads the weights at ~13-16 GB/s per core, below memory speed.
// Here the activations are int8 digits (Int8Activations, packed_gemv_int8_prep.cpp) and the codes stay bytes:
// a 2-bit word shifted right by 2j and masked with 0x03030303 holds, per byte b, the code of k = 4b + j of its
// 16 inputs, which vpdpbusd multiplies with 4 digits of x (one broadcast int32) and adds to an int32 lane:
// shift, and, one dot product per digit for 4 inputs x 16 columns. 3-bit: the hi bits are moved next to the lo
// codes once per word row (V::spread_hi: vpmultishiftqb on AVX-512, vpshufb and two shifts on AVX2), so each
// byte fed to the dot product is the whole 3-bit code (V::code3) and 3-bit costs the dot products of 2-bit.
// 4-bit: nibbles (w >> 4j) & 0x0F0F0F0F, k = 2b + j.
// Per group and digit d the int32 sum is exact; then per column, in fp32:
//   y += s * unit * sum_d 256^(parts-1-d) (acc_d - z * sum_group(digit_d)),
// i.e. the exact product of W with the rounded activations, up to fp32 rounding of that combination.
// Work split: a block of the plan (a run of whole register tiles of V::kLanes * NV columns) is walked one panel
// of word rows at a time across all its tiles; rows of x in tiles of MT sharing each unpacked word.

namespace {

// Word rows whose int16 sums cannot overflow (V::kInt16Sums): each 16-bit half of a column's lane sums 2 products
// per shift, |code * digit| <= 15 * 128; 4 rows are 32 products of 2- or 3-bit codes (<= 7 * 128 * 32 = 28,672)
// or 16 of 4-bit codes (15 * 128 * 16 = 30,720).
constexpr int64_t kRowsPerInt16Sum = 4;

template <class V, int BITS, int P, int MT, int NV>
inline void int8_block(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0, int64_t m0,
                       int64_t g_begin, int64_t g_end) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int kL = V::kLanes;
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  constexpr int J = kPerWord / 4;  // shifts per word
  const int64_t ops = p.k_padded / 4;
  const I mask = V::set1_i(BITS == 4 ? 0x0F0F0F0F : 0x03030303);
  const I code3 = V::set1_i(0x07070707);
  const int32_t* xo[MT][P];
  for (int m = 0; m < MT; ++m)
    for (int d = 0; d < P; ++d) xo[m][d] = a.operands.data() + ((m0 + m) * P + d) * ops;
  // y holds the sum over the groups before g_begin (the bias before the first)
  F yacc[MT][NV];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v)
      yacc[m][v] = g_begin > 0 ? V::load(p.y + (m0 + m) * p.N + n0 + v * kL)
                               : (p.bias ? V::load(p.bias + n0 + v * kL) : V::zero());
  const int64_t rows = (p.K + kPerWord - 1) / kPerWord;
  // prefetch the same columns of the next panel (g_begin..g_end is one panel, int8_columns_bp): it is read
  // after this panel's pass over the whole block; the hardware streams along each row meanwhile
  const int64_t ahead = std::max<int64_t>(1, (g_end - g_begin) * p.group_len / kPerWord);
  // rows N words apart fall in the same L1 sets when N * 4 bytes is a multiple of 4 KiB: the next panel's
  // lines, fetched into L1 beside this panel's, then evict them; into L2 only (measured, docs/NOTES.md)
  const bool l2 = p.N % 1024 == 0;
  const int32_t* wbase = p.qweight + n0;

  // the dot products of word rows r0 .. r1 - 1 added to s: int16 sums where V::kInt16Sums, else int32
  auto rows_into = [&](I (&s)[MT][P][NV], int64_t r0, int64_t r1) __attribute__((always_inline)) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r + ahead < rows) V::prefetch(wbase + (r + ahead) * p.N, NV, l2);
      I w[NV], hx[NV];
      for (int v = 0; v < NV; ++v) {
        w[v] = V::load_i(wbase + r * p.N + v * kL);
        if constexpr (BITS == 3) {  // nibble b of this row's 16 hi bits -> bits 2..5 of byte b
          if (r + ahead < rows && (r & 1) == 0)
            V::prefetch(p.qweight_hi + n0 + ((r + ahead) >> 1) * p.N, NV, l2);
          hx[v] = V::spread_hi(V::load_i(p.qweight_hi + n0 + (r >> 1) * p.N + v * kL), (int)(r & 1));
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) {
        I c[NV];
        for (int v = 0; v < NV; ++v) {
          if constexpr (BITS == 3)  // (lo code | 4 * hi bit) of k = 4b + j in byte b: the whole 3-bit code
            c[v] = V::code3(w[v], hx[v], j, mask, code3);
          else
            c[v] = V::and_i(V::srl(w[v], j * kWidth), mask);
        }
        for (int m = 0; m < MT; ++m)
          for (int d = 0; d < P; ++d) {
            const I xb = V::set1_i(xo[m][d][r * J + j]);
            for (int v = 0; v < NV; ++v) {
              if constexpr (V::kInt16Sums) s[m][d][v] = V::dot16(s[m][d][v], c[v], xb);
              else s[m][d][v] = V::dot(s[m][d][v], c[v], xb);
            }
          }
      }
    }
  };
  auto zero_all = [](I (&s)[MT][P][NV]) __attribute__((always_inline)) {
    for (int m = 0; m < MT; ++m)
      for (int d = 0; d < P; ++d)
        for (int v = 0; v < NV; ++v) s[m][d][v] = V::zero_i();
  };

  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t r_begin = g * p.group_len / kPerWord;
    const int64_t r_end = ((g + 1) * p.group_len + kPerWord - 1) / kPerWord;
    I acc[MT][P][NV];  // int32 sums of the group
    zero_all(acc);
    if constexpr (!V::kInt16Sums) {
      rows_into(acc, r_begin, r_end);
    } else if (r_end - r_begin <= kRowsPerInt16Sum) {  // the usual group: its int16 sums widened once
      rows_into(acc, r_begin, r_end);
      for (int m = 0; m < MT; ++m)
        for (int d = 0; d < P; ++d)
          for (int v = 0; v < NV; ++v) acc[m][d][v] = V::widen16(acc[m][d][v]);
    } else {  // a long group: int16 sums of runs of rows, each widened into acc
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowsPerInt16Sum) {
        I part[MT][P][NV];
        zero_all(part);
        rows_into(part, r0, std::min(r_end, r0 + kRowsPerInt16Sum));
        for (int m = 0; m < MT; ++m)
          for (int d = 0; d < P; ++d)
            for (int v = 0; v < NV; ++v) acc[m][d][v] = V::add_i(acc[m][d][v], V::widen16(part[m][d][v]));
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t idx = g * p.N + n0 + v * kL;
      const F s = V::load_scales(p.scales, p.scale_type, idx);
      const F z = V::load_zeros(p.zeros + idx);
      for (int m = 0; m < MT; ++m) {
        const int64_t mg = (m0 + m) * p.G + g;
        const float* ps = a.part_sum.data() + mg * P;
        F D = V::fnmadd(z, V::set1(ps[0]), V::cvt(acc[m][0][v]));
        for (int d = 1; d < P; ++d) D = V::fma(D, V::set1(256.0f), V::fnmadd(z, V::set1(ps[d]), V::cvt(acc[m][d][v])));
        yacc[m][v] = V::fma(V::mul(s, V::set1(a.unit[mg])), D, yacc[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v)
    for (int m = 0; m < MT; ++m) V::store(p.y + (m0 + m) * p.N + n0 + v * kL, yacc[m][v]);
}

// One block: M = 1 in one pass of NV1 vectors; more rows in tiles of MT rows (then 2, 1) of NVM vectors.
// A block of `subs` register tiles is walked one panel (the word rows of 64 inputs, or of one group if larger)
// at a time across all its tiles, so that each word row is read as one contiguous run over the whole block
// (format v1 puts a row's columns next to each other and the rows N words apart: short pieces of rows in a
// different page each stream poorly from DRAM; see kInt8BlocksPerThread).
template <class V, int BITS, int P, int NV1, int NVM, int MT>
inline void int8_columns_bp(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                            int64_t subs) {
  const int64_t width = (p.M == 1 ? NV1 : NVM) * V::kLanes;
  // one panel: the rows of (at least) 64 inputs, each read once across all the sub-blocks
  const int64_t g_step = std::max<int64_t>(1, 64 / p.group_len);
  for (int64_t g0 = 0; g0 < p.G; g0 += g_step) {
    const int64_t g1 = std::min(p.G, g0 + g_step);
    for (int64_t c = 0; c < subs; ++c) {
      const int64_t nc = n0 + c * width;
      if (p.M == 1) {
        int8_block<V, BITS, P, 1, NV1>(p, a, nc, 0, g0, g1);
        continue;
      }
      int64_t m = 0;
      for (; m + MT <= p.M; m += MT) int8_block<V, BITS, P, MT, NVM>(p, a, nc, m, g0, g1);
      if (MT > 2 && m + 2 <= p.M) {
        int8_block<V, BITS, P, 2, NVM>(p, a, nc, m, g0, g1);
        m += 2;
      }
      if (m < p.M) int8_block<V, BITS, P, 1, NVM>(p, a, nc, m, g0, g1);
    }
  }
}

// Rows of x per tile: at most MT, and no more accumulators (rows x digits x vectors) than V::kAccumulators, the
// registers left after the codes, the broadcast digit and the masks (more spill to the stack every word row).
template <class V, int P, int NVM, int MT>
constexpr int tile_rows() {
  const int fit = V::kAccumulators / (P * NVM);
  return fit < 1 ? 1 : (fit < MT ? fit : MT);
}

template <class V, int NV1, int NVM, int MT, int BITS>
inline void int8_columns_b(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                           int64_t subs) {
  switch (a.parts) {
    case 1: int8_columns_bp<V, BITS, 1, NV1, NVM, tile_rows<V, 1, NVM, MT>()>(p, a, n0, subs); break;
    case 2: int8_columns_bp<V, BITS, 2, NV1, NVM, tile_rows<V, 2, NVM, MT>()>(p, a, n0, subs); break;
    default: int8_columns_bp<V, BITS, 3, NV1, NVM, tile_rows<V, 3, NVM, MT>()>(p, a, n0, subs); break;
  }
}

template <class V, int NV1, int NVM, int MT>
inline void int8_columns(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                         int64_t subs) {
  switch (p.bits) {
    case 2: int8_columns_b<V, NV1, NVM, MT, 2>(p, a, n0, subs); break;
    case 3: int8_columns_b<V, NV1, NVM, MT, 3>(p, a, n0, subs); break;
    default: int8_columns_b<V, NV1, NVM, MT, 4>(p, a, n0, subs); break;
  }
}

}  // namespace
