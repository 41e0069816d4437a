// Small-M packed matmul on integer dot products, written once over a vector-traits type V (AVX-512 VNNI: one
// vpdpbusd; AVX2: vpmaddubsw + vpaddw, int16 sums). Include it only after the file's `#pragma GCC target`.
//
// Why: the exact kernels convert every code to fp32 (or look it up) before multiplying, ~2 instructions per
// code and 16 columns, which on a 2-core Zen 4 reads the weights at ~13-16 GB/s per core, below memory speed.
// Here the activations are int8 digits (Int8Activations, packed_gemv_int8_prep.cpp) and the codes stay bytes:
// a 2-bit word shifted right by 2j and masked with 0x03030303 holds, per byte b, the code of k = 4b + j of its
// 16 inputs, which vpdpbusd multiplies with 4 digits of x (one int32 broadcast, or at M = 1 on AVX2 loaded as 8
// copies: Int8Activations::replicas) and adds to an int32 lane:
// shift, and, one dot product per digit for 4 inputs x 16 columns. 3-bit: the hi bits are moved next to the lo
// codes once per word row (V::spread_hi: vpmultishiftqb on AVX-512, vpshufb and shifts on AVX2), so each byte fed
// to the dot product is the whole 3-bit code (V::code3) and 3-bit costs the dot products of 2-bit. In the CPU word
// order the codes are re-packed (word_order.h: byte b holds codes 4b, 4b + 1 whole, the hi nibble 4b + 2), so that
// V::code3_cpu takes most of them with one or two operations.
// 4-bit: nibbles (w >> 4j) & 0x0F0F0F0F, k = 2b + j.
// Per group and digit d the int32 sum acc_d is exact; then per column (int_parts: the top digits joined in int32)
//   y += s * unit * (sum_d 256^(parts-1-d) acc_d - z * sum_group(Q)),
// i.e. the exact product of W with the rounded activations, up to fp32 rounding of that combination (as the
// exact kernels split off z * sum(x)).
// Work split: a block of the plan (a run of whole register tiles of V::kLanes * NV columns) is walked one panel
// of word rows at a time across all its tiles; rows of x in tiles of MT sharing each unpacked word. The words in
// format v1 or the CPU word order (word_order.h), a compile-time choice.

namespace {

// Word rows whose int16 sums cannot overflow (V::kInt16Sums): each 16-bit half of a column's lane sums 2 products
// per shift, |code * digit| <= 15 * 128; 4 rows are 32 products of 2- or 3-bit codes (<= 7 * 128 * 32 = 28,672)
// or 16 of 4-bit codes (15 * 128 * 16 = 30,720).
constexpr int64_t kRowsPerInt16Sum = 4;

// How many of the top digits the epilogue joins in int32 (t = 256 t + acc_d) before one conversion to fp32: each
// digit joined there saves a conversion and a multiply-add, and the multiply-adds share Zen 4's pipes with
// vpdpbusd (AVX-512 VNNI, 2-bit, three digits: 13.6 -> 12.8 cycles a word row). As many as keep the group's sum
// of code x (top digits of Q) inside int32 (2-bit g64: all three; 3-bit: two); groups whose length is unknown
// while compiling (GR = 0) convert every digit.
template <int BITS, int P>
constexpr int int_parts(int64_t inputs) {
  int n = P;
  if (inputs == 0) return 1;
  for (; n > 1; --n) {
    const int64_t top = (int64_t)saliq::kInt8Qmax[P] / ((int64_t)1 << (8 * (P - n))) + 1;  // |top n digits of Q|
    if (inputs * ((1 << BITS) - 1) * top <= INT32_MAX) break;
  }
  return n;
}

// One panel (groups g_begin .. g_end - 1, the word rows of at least 64 inputs) of rows m0 .. m0 + MT - 1 of x,
// over `tiles` register tiles of NV vectors from column n_first. One call covers the whole run of tiles, so the
// setup (digit pointers, masks, row range, prefetch distance) is paid once per panel, not once per tile and panel
// (at 16 columns per AVX2 tile it had cost a third of the instructions). GR: the word rows of a group when
// known at compile time (groups of 64, the default), else 0. R: copies of each digit operand (Int8Activations).
// CPU_ORDER: the words in the CPU word order (word_order.h), else format v1.
template <class V, int BITS, int P, int MT, int NV, int GR, int R, bool CPU_ORDER>
inline void int8_panel(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n_first,
                       int64_t tiles, int64_t m0, int64_t g_begin, int64_t g_end) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int kL = V::kLanes;
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  constexpr int J = kPerWord / 4;  // shifts per word
  const int64_t ops = p.k_padded / 4;
  constexpr int kIntParts = int_parts<BITS, P>((int64_t)GR * kPerWord);
  // int16 sums: the top digit's widened by vpmaddwd with 256 instead of 1, which saves the epilogue its first
  // shift (and measured 26.7 -> 24.3 cycles a word row on the AVX2 form, 3-bit two digits)
  constexpr bool kTopScaled = V::kInt16Sums && kIntParts >= 2;
  const I mask = V::set1_i(BITS == 4 ? 0x0F0F0F0F : 0x03030303);
  const I code3 = V::set1_i(0x07070707);
  const int32_t* xo[MT][P];
  for (int m = 0; m < MT; ++m)
    for (int d = 0; d < P; ++d) xo[m][d] = a.operands.data() + ((m0 + m) * P + d) * ops * R;
  // Format v1: prefetch the same columns of the next panel, read after this panel's pass over the whole block;
  // the hardware streams along each row meanwhile. The CPU word order reads a block's panels as one stream (a
  // run per panel): prefetch along it, kAhead words past each piece a row reads (one thread, 11008 x 4096 and
  // 4096 x 11008: 1.08-1.39x faster than format v1, where the next panel's pieces gave 0.99-1.16x; docs/NOTES.md)
  const int64_t ahead = std::max<int64_t>(1, (g_end - g_begin) * p.group_len / kPerWord);
  constexpr int64_t kAhead = (8 << 10) / 4;
  const saliq::PrefetchTo to = a.prefetch;
  constexpr int64_t kTileBytes = NV * kL * 4;  // one word row of a tile
  const int64_t scale_bytes = p.scale_type == saliq::ScaleType::F32 ? 4 : 2;

  // the dot products added to s: int16 sums where V::kInt16Sums, else int32
  const saliq::PlaneOrder lo = p.lo, hi = p.hi;  // locals: the stores to y could alias p's fields
  // Rows rs .. re - 1 of one band (format v1: any rows), each word an address mode off the run's first word:
  // word (r, n + c) at w0 + (r - rs) * row_step + (c / 16) * strip_step + c % 16, the hi plane's likewise, the
  // prefetched piece of row r at p0 + (r - rs) * pf_step. Called with the steps of format v1 (rows N words apart)
  // or of the CPU word order (rows 16 words apart, strips 16 h).
  auto rows_run = [&](I (&s)[MT][P][NV], int64_t rs, int64_t re, const int32_t* w0, const int32_t* p0,
                      const int32_t* h0, const int32_t* hp0, int64_t row_step, int64_t strip_step,
                      int64_t hi_strip_step, int64_t pf_step) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int64_t r = rs; r < re; ++r) {
      // past the last row too: a prefetch never faults, and one test fewer per row
      saliq::prefetch_lines(p0 + (r - rs) * pf_step, kTileBytes, to);
      const int64_t dh = (r >> 1) - (rs >> 1);  // the hi row serves two word rows
      if constexpr (BITS == 3)
        if ((r & 1) == 0) saliq::prefetch_lines(hp0 + dh * pf_step, kTileBytes, to);
      I w[NV], hx[NV];
      for (int v = 0; v < NV; ++v) {
        const int c = v * kL;
        w[v] = V::load_i(w0 + (r - rs) * row_step + (c >> 4) * strip_step + (c & 15));
        if constexpr (BITS == 3) {  // nibble b of this row's 16 hi bits -> bits 2..5 of byte b (CPU order: 0..3)
          const I h = V::load_i(h0 + dh * row_step + (c >> 4) * hi_strip_step + (c & 15));
          hx[v] = CPU_ORDER ? V::spread_hi_cpu(h, (int)(r & 1)) : V::spread_hi(h, (int)(r & 1));
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) {
        I c[NV];
        for (int v = 0; v < NV; ++v) {
          if constexpr (BITS == 3)  // the whole 3-bit code of k = 4b + j in byte b
            c[v] = CPU_ORDER ? V::code3_cpu(w[v], hx[v], j, mask, code3) : V::code3(w[v], hx[v], j, mask, code3);
          else
            c[v] = V::and_i(V::srl(w[v], j * kWidth), mask);
        }
        for (int m = 0; m < MT; ++m)
          for (int d = 0; d < P; ++d) {
            const int32_t* xd = xo[m][d] + (r * J + j) * R;
            const I xb = R == V::kLanes ? V::load_i(xd) : V::set1_i(*xd);
            for (int v = 0; v < NV; ++v) {
              if constexpr (V::kInt16Sums) s[m][d][v] = V::dot16(s[m][d][v], c[v], xb);
              else s[m][d][v] = V::dot(s[m][d][v], c[v], xb);
            }
          }
      }
    }
  };
  // the dot products of word rows r0 .. r1 - 1 added to s, in runs of one band
  auto rows_into = [&](I (&s)[MT][P][NV], int64_t n, int64_t r0, int64_t r1) __attribute__((always_inline)) {
    const int32_t* const hplane = BITS == 3 ? p.qweight_hi : p.qweight;  // (the hi addresses unused unless 3-bit)
    auto lo_ahead = [&](int64_t r, int64_t nn) __attribute__((always_inline)) {
      return lo.ahead_in_block(p.qweight, r, nn, NV * kL, n_first, tiles * NV * kL, kAhead);
    };
    auto hi_ahead = [&](int64_t r, int64_t nn) __attribute__((always_inline)) {
      return hi.ahead_in_block(hplane, r, nn, NV * kL, n_first, tiles * NV * kL, kAhead);
    };
    if constexpr (!CPU_ORDER) {
      rows_run(s, r0, r1, p.qweight + r0 * lo.N + n, p.qweight + (r0 + ahead) * lo.N + n,
               hplane + (r0 >> 1) * lo.N + n, hplane + ((r0 + ahead) >> 1) * lo.N + n, lo.N, 16, 16, lo.N);
    } else if constexpr (GR != 0) {
      // groups of 64 inputs: K is a multiple of 64, so the rows lie in one whole band and every step is a
      // constant (lo.tile, hi.tile and ahead_in_block written out for h = the band's rows; r0 may be inside the
      // band where int16 sums split a group)
      constexpr int64_t kLoBand = saliq::cpu_order_band(kWidth), kHiBand = saliq::cpu_order_band(1);
      const int64_t N = lo.N, b0 = r0 & ~(kLoBand - 1), r0h = r0 >> 1, hb0 = r0h & ~(kHiBand - 1);
      const int64_t lo_run = tiles * NV * kL * kLoBand, hi_run = tiles * NV * kL * kHiBand;
      const int64_t lo_in = (n - n_first) * kLoBand + (r0 - b0) * NV * kL;  // the piece's place in its run
      const int64_t hi_in = (n - n_first) * kHiBand + (r0h - hb0) * NV * kL;
      const int32_t* const lo_piece = p.qweight + b0 * N + n * kLoBand + (r0 - b0) * NV * kL;
      const int32_t* const hi_piece = hplane + hb0 * N + n * kHiBand + (r0h - hb0) * NV * kL;
      const int32_t* const p0 = lo_in + kAhead < lo_run ? lo_piece + kAhead : lo_piece + kLoBand * N + kAhead - lo_run;
      const int32_t* const hp0 =
          hi_in + kAhead < hi_run ? hi_piece + kAhead : hi_piece + kHiBand * N + kAhead - hi_run;
      rows_run(s, r0, r1, p.qweight + b0 * N + n * kLoBand + (r0 - b0) * 16, p0,
               hplane + hb0 * N + n * kHiBand + (r0h - hb0) * 16, hp0, 16, 16 * kLoBand, 16 * kHiBand, NV * kL);
    } else {
      for (int64_t rs = r0, re; rs < r1; rs = re) {  // runs of one band, the short last one too
        re = lo.run_end(rs, r1);
        const saliq::PlaneOrder::Tile wt = lo.tile(p.qweight, rs, n), ht = hi.tile(hplane, rs >> 1, n);
        rows_run(s, rs, re, wt.first, lo_ahead(rs, n), ht.first, hi_ahead(rs >> 1, n), 16, wt.strip_step,
                 ht.strip_step, NV * kL);
      }
    }
  };
  auto zero_all = [](I (&s)[MT][P][NV]) __attribute__((always_inline)) {
    for (int m = 0; m < MT; ++m)
      for (int d = 0; d < P; ++d)
        for (int v = 0; v < NV; ++v) s[m][d][v] = V::zero_i();
  };

  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t r_begin = GR ? g * GR : g * p.group_len / kPerWord;
    const int64_t r_end = GR ? r_begin + GR : ((g + 1) * p.group_len + kPerWord - 1) / kPerWord;
    // what every tile of the group shares, copied out of the vectors (locals: not reloaded after each store to y)
    float unit[MT], q_sum[MT];
    for (int m = 0; m < MT; ++m) {
      const int64_t mg = (m0 + m) * p.G + g;
      unit[m] = a.unit[mg];
      double sum = 0.0;  // the group's sum of Q (exact in double), rounded once
      for (int d = 0; d < P; ++d) sum = sum * 256.0 + a.part_sum[mg * P + d];
      q_sum[m] = (float)sum;
    }
    float* yrow = p.y + m0 * p.N + n_first;
    // the tiles, left to right: each adds this group to y (the sum of the groups before, or the bias, or zero)
    for (int64_t t = 0, n = n_first; t < tiles; ++t, n += NV * kL) {
      F yacc[MT][NV];
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NV; ++v)
          yacc[m][v] = g > 0 ? V::load(yrow + m * p.N + t * NV * kL + v * kL)
                             : (p.bias ? V::load(p.bias + n + v * kL) : V::zero());
      I acc[MT][P][NV];  // int32 sums of the group
      zero_all(acc);
      if constexpr (!V::kInt16Sums) {
        rows_into(acc, n, r_begin, r_end);
      } else if (GR ? GR <= kRowsPerInt16Sum : r_end - r_begin <= kRowsPerInt16Sum) {
        // the usual group: its int16 sums widened once
        rows_into(acc, n, r_begin, r_end);
        for (int m = 0; m < MT; ++m)
          for (int d = 0; d < P; ++d)
            for (int v = 0; v < NV; ++v) acc[m][d][v] = V::widen16(acc[m][d][v], d == 0 && kTopScaled ? 256 : 1);
      } else {  // a long group: int16 sums of runs of rows, each widened into acc
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowsPerInt16Sum) {
          I part[MT][P][NV];
          zero_all(part);
          rows_into(part, n, r0, std::min(r_end, r0 + kRowsPerInt16Sum));
          for (int m = 0; m < MT; ++m)
            for (int d = 0; d < P; ++d)
              for (int v = 0; v < NV; ++v)
                acc[m][d][v] = V::add_i(acc[m][d][v], V::widen16(part[m][d][v], d == 0 && kTopScaled ? 256 : 1));
        }
      }
      // the next group's scales and zeros of this tile, read after this group's pass over the block: each group's
      // are a run of their own N values further on (a new page for the hardware prefetcher every group). One thread,
      // caches flushed, alternated in one process: 2-bit 11008 x 4096 / 4096 x 11008 7-10% faster, 3-bit 14-18%
      const char* next_scales = static_cast<const char*>(p.scales) + ((g + 1) * p.N + n) * scale_bytes;
      saliq::prefetch_lines(next_scales, NV * kL * scale_bytes, to);
      saliq::prefetch_lines(p.zeros + (g + 1) * p.N + n, NV * kL * (int64_t)sizeof(int16_t), to);
      for (int v = 0; v < NV; ++v) {
        const int64_t idx = g * p.N + n + v * kL;
        const F s = V::load_scales(p.scales, p.scale_type, idx);
        const F z = V::load_zeros(p.zeros + idx);
        for (int m = 0; m < MT; ++m) {
          I t = acc[m][0][v];  // sum of codes x Q over the top kIntParts digits, exact in int32
          for (int d = 1; d < kIntParts; ++d) t = V::add_i(d == 1 && kTopScaled ? t : V::sll(t, 8), acc[m][d][v]);
          F D = V::cvt(t);
          for (int d = kIntParts; d < P; ++d) D = V::fma(D, V::set1(256.0f), V::cvt(acc[m][d][v]));
          D = V::fnmadd(z, V::set1(q_sum[m]), D);
          yacc[m][v] = V::fma(V::mul(s, V::set1(unit[m])), D, yacc[m][v]);
        }
      }
      for (int v = 0; v < NV; ++v)
        for (int m = 0; m < MT; ++m) V::store(yrow + m * p.N + t * NV * kL + v * kL, yacc[m][v]);
    }
  }
}

// One block: M = 1 in one pass of NV1 vectors; more rows in tiles of MT rows (then 2, 1) of NVM vectors.
// A block of `subs` register tiles is walked one panel (the word rows of 64 inputs, or of one group if larger)
// at a time across all its tiles: in the CPU word order the panel's words of the block are one run; in format v1
// each word row is one run over the whole block (its rows N words apart: short pieces of rows in a different
// page each stream poorly from DRAM; see kInt8BlocksPerThread). CO: the CPU word order.
template <class V, int BITS, int P, int NV1, int NVM, int MT, int GR, bool CO>
inline void int8_columns_bp(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                            int64_t subs) {
  // one panel: the rows of (at least) 64 inputs, each read once across all the sub-blocks
  const int64_t g_step = std::max<int64_t>(1, 64 / p.group_len);
  for (int64_t g0 = 0; g0 < p.G; g0 += g_step) {
    const int64_t g1 = std::min(p.G, g0 + g_step);
    if (p.M == 1) {
      int8_panel<V, BITS, P, 1, NV1, GR, V::kDigitReplicasM1, CO>(p, a, n0, subs, 0, g0, g1);
      continue;
    }
    // M > 1: tile by tile, every row tile of x in turn, so each tile's codes are read again from L1
    for (int64_t c = 0; c < subs; ++c) {
      const int64_t nc = n0 + c * NVM * V::kLanes;
      int64_t m = 0;
      for (; m + MT <= p.M; m += MT) int8_panel<V, BITS, P, MT, NVM, GR, 1, CO>(p, a, nc, 1, m, g0, g1);
      if (MT > 2 && m + 2 <= p.M) {
        int8_panel<V, BITS, P, 2, NVM, GR, 1, CO>(p, a, nc, 1, m, g0, g1);
        m += 2;
      }
      if (m < p.M) int8_panel<V, BITS, P, 1, NVM, GR, 1, CO>(p, a, nc, 1, m, g0, g1);
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

template <class V, int NV1, int NVM, int MT, int BITS, int GR, bool CO>
inline void int8_columns_bg(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                            int64_t subs) {
  switch (a.parts) {
    case 1: int8_columns_bp<V, BITS, 1, NV1, NVM, tile_rows<V, 1, NVM, MT>(), GR, CO>(p, a, n0, subs); break;
    case 2: int8_columns_bp<V, BITS, 2, NV1, NVM, tile_rows<V, 2, NVM, MT>(), GR, CO>(p, a, n0, subs); break;
    // 3-bit, three digits: tiles of 2 rows, not 3 (AVX-512 VNNI, cycles per word row and row of x at M = 4 / 8 /
    // 16: 20.0 / 17.8 / 18.4 -> 17.7 / 17.2 / 17.1)
    default:
      int8_columns_bp<V, BITS, 3, NV1, NVM, tile_rows<V, 3, NVM, (BITS == 3 && MT > 2 ? 2 : MT)>(), GR, CO>(p, a, n0,
                                                                                                     subs);
      break;
  }
}

// Groups of 64 (the default) with their word rows known at compile time (the int16-sum path chosen while
// compiling); other lengths counted at run time. The word order is a compile-time choice too: one kernel holding
// both address forms was 10-25% slower in either (cycles per word row, AVX-512 VNNI and AVX2, 3-bit).
template <class V, int NV1, int NVM, int MT, int BITS>
inline void int8_columns_b(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                           int64_t subs) {
  constexpr int GR = BITS == 4 ? 8 : 4;
  const bool cpu_order = p.lo.band > 1;
  if (p.group_len == 64) {
    if (cpu_order) int8_columns_bg<V, NV1, NVM, MT, BITS, GR, true>(p, a, n0, subs);
    else int8_columns_bg<V, NV1, NVM, MT, BITS, GR, false>(p, a, n0, subs);
  } else {
    if (cpu_order) int8_columns_bg<V, NV1, NVM, MT, BITS, 0, true>(p, a, n0, subs);
    else int8_columns_bg<V, NV1, NVM, MT, BITS, 0, false>(p, a, n0, subs);
  }
}

// NVM3: the vectors of an M > 1 tile at 3 bits, whose codes hold more registers (the hi words and their spread)
template <class V, int NV1, int NVM, int MT, int NVM3 = NVM>
inline void int8_columns(const saliq::PackedGemvProblem& p, const saliq::Int8Activations& a, int64_t n0,
                         int64_t subs) {
  switch (p.bits) {
    case 2: int8_columns_b<V, NV1, NVM, MT, 2>(p, a, n0, subs); break;
    case 3: int8_columns_b<V, NV1, NVM3, MT, 3>(p, a, n0, subs); break;
    default: int8_columns_b<V, NV1, NVM, MT, 4>(p, a, n0, subs); break;
  }
}

}  // namespace
