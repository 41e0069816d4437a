// Small-M packed matmul kernel shared by the AVX2 and AVX-512 files, written once over a vector-traits
// type V. Include it only after the file's `#pragma GCC target`, so that it is compiled for that target.
//
// Work split: a block of NV vectors of columns (N is contiguous in format v1) and MT rows of x; for each
// packed word row the codes are unpacked once (shift, mask, convert) and multiplied-added into MT x NV
// per-group accumulators with x[m, k] broadcast; at each group end y += s * (acc - z * sum_group(x)).
// Blocks are independent: any thread may compute any block, each output element is written by one block.
// L3: 3-bit codes in the CPU word order's bits (word_order.h), else format v1's.

namespace {

template <class V, int BITS, int MT, int NV, bool L3 = false>
inline void fma_block(const saliq::PackedGemvProblem& p, int64_t n0, int64_t m0) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int kL = V::kLanes;
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const I mask = V::set1_i((1 << kWidth) - 1);
  const I bit2 = V::set1_i(4);
  const I code3 = V::set1_i(7);
  F yacc[MT][NV];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) yacc[m][v] = V::zero();
  const float* xrow[MT];
  for (int m = 0; m < MT; ++m) xrow[m] = p.x + (m0 + m) * p.k_padded;

  for (int64_t g = 0; g < p.G; ++g) {
    F acc[MT][NV];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
    const int64_t r_begin = g * p.group_len / kPerWord;
    const int64_t r_end = ((g + 1) * p.group_len + kPerWord - 1) / kPerWord;
    for (int64_t r = r_begin; r < r_end; ++r) {
      I w[NV], h[NV];
      const saliq::PlaneOrder::Row wrow = p.lo.row(p.qweight, r);
      const saliq::PlaneOrder::Row hrow = BITS == 3 ? p.hi.row(p.qweight_hi, r >> 1) : saliq::PlaneOrder::Row{};
      for (int v = 0; v < NV; ++v) {
        w[v] = V::load_i(wrow.at(n0 + v * kL));
        if (BITS == 3) {  // the third bit of k = 16 r + j sits at bit 16 (r & 1) + j of hi word r / 2
          h[v] = V::srl(V::load_i(hrow.at(n0 + v * kL)), 16 * (int)(r & 1));
          if (!L3) h[v] = V::sll(h[v], 2);
        }
      }
      const int64_t k0 = r * kPerWord;
#pragma GCC unroll 16
      for (int j = 0; j < kPerWord; ++j) {
        F xb[MT];
        for (int m = 0; m < MT; ++m) xb[m] = V::set1(xrow[m][k0 + j]);
        for (int v = 0; v < NV; ++v) {
          I c;
          if (L3) {  // code 4b + i: byte b of w holds i = 0, 1 and 3's low bits, nibble b of h 2 and 3's third bit
            const int b = j >> 2;
            if ((j & 3) == 0) c = V::and_i(V::srl(w[v], 8 * b), code3);
            else if ((j & 3) == 1) c = V::and_i(V::srl(w[v], 8 * b + 3), code3);
            else if ((j & 3) == 2) c = V::and_i(V::srl(h[v], 4 * b), code3);
            else c = V::or_i(V::and_i(V::srl(w[v], 8 * b + 6), mask), V::and_i(V::srl(h[v], 4 * b + 1), bit2));
          } else {
            c = V::and_i(V::srl(w[v], j * kWidth), mask);
            if (BITS == 3) c = V::or_i(c, V::and_i(V::srl(h[v], j), bit2));
          }
          const F f = V::cvt(c);
          for (int m = 0; m < MT; ++m) acc[m][v] = V::fma(f, xb[m], acc[m][v]);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t idx = g * p.N + n0 + v * kL;
      const F s = V::load_scales(p.scales, p.scale_type, idx);
      const F z = V::load_zeros(p.zeros + idx);
      for (int m = 0; m < MT; ++m) {
        const F xs = V::set1(p.x_group_sum[(m0 + m) * p.G + g]);
        yacc[m][v] = V::fma(s, V::fnmadd(z, xs, acc[m][v]), yacc[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const F b = p.bias ? V::load(p.bias + n0 + v * kL) : V::zero();
    for (int m = 0; m < MT; ++m) V::store(p.y + (m0 + m) * p.N + n0 + v * kL, V::add(yacc[m][v], b));
  }
}

template <class V, int BITS, int NV, bool L3 = false>
inline void fma_columns(const saliq::PackedGemvProblem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) fma_block<V, BITS, 4, NV, L3>(p, n0, m);
  switch (p.M - m) {
    case 3: fma_block<V, BITS, 3, NV, L3>(p, n0, m); break;
    case 2: fma_block<V, BITS, 2, NV, L3>(p, n0, m); break;
    case 1: fma_block<V, BITS, 1, NV, L3>(p, n0, m); break;
    default: break;
  }
}

// One block of V::kLanes * NV columns, all rows of x.
template <class V, int NV>
inline void fma_columns_any_bits(const saliq::PackedGemvProblem& p, int64_t n0) {
  switch (p.bits) {
    case 2: fma_columns<V, 2, NV>(p, n0); break;
    case 3:  // the CPU word order re-packs 3-bit codes
      if (p.lo.band > 1) fma_columns<V, 3, NV, true>(p, n0);
      else fma_columns<V, 3, NV>(p, n0);
      break;
    default: fma_columns<V, 4, NV>(p, n0); break;
  }
}

}  // namespace
