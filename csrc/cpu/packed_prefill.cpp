// Portable dequantizer for the prefill GEMM (packed_prefill.h) and the choice between it and the AVX-512 one.
#include "cpu/packed_prefill.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace saliq {
namespace {

// Plain loops over the inputs of one word (a constant count the compiler vectorises with variable shifts);
// c10's conversions round to nearest even like the AVX-512 instructions.
template <int BITS, typename OutT>
__attribute__((target_clones("avx512f", "avx2", "default"))) void rows_portable(
    const PackedGemvProblem& p, int64_t n0, int64_t nt, OutT* out, int64_t ld) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(p.qweight);
  const uint32_t* qh = reinterpret_cast<const uint32_t*>(p.qweight_hi);
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t n = n0 + j;
    OutT* row = out + j * ld;
    for (int64_t g = 0; g < p.G; ++g) {
      const float s = load_scale(p.scales, p.scale_type, g * p.N + n);
      const float z = (float)p.zeros[g * p.N + n];
      const int64_t k_begin = g * p.group_len, k_end = std::min(k_begin + p.group_len, p.K);
      // groups are whole words except a per-channel group whose K ends inside a word
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kPerWord) {
        uint32_t w = qw[p.lo.index(k0 / kPerWord, n)];
        uint32_t h = BITS == 3 ? qh[p.hi.index(k0 / 32, n)] >> (k0 % 32) : 0u;
        // the CPU word order's 3-bit codes back in format v1's bits (word_order.h)
        if (BITS == 3 && p.lo.band > 1) cpu3_to_v1(w, h, &w, &h);
        const int count = (int)std::min<int64_t>(kPerWord, k_end - k0);
        auto one = [&](int i) {
          uint32_t q = (w >> (i * kWidth)) & ((1u << kWidth) - 1u);
          if (BITS == 3) q |= ((h >> i) & 1u) << 2;
          row[k0 + i] = OutT(((float)(int32_t)q - z) * s);
        };
        if (count == kPerWord) {
          for (int i = 0; i < kPerWord; ++i) one(i);
        } else {
          for (int i = 0; i < count; ++i) one(i);
        }
      }
    }
  }
}

template <typename OutT>
void portable_of_type(const PackedGemvProblem& p, int64_t n0, int64_t nt, OutT* out, int64_t ld) {
  switch (p.bits) {
    case 2: rows_portable<2, OutT>(p, n0, nt, out, ld); break;
    case 3: rows_portable<3, OutT>(p, n0, nt, out, ld); break;
    default: rows_portable<4, OutT>(p, n0, nt, out, ld); break;
  }
}

}  // namespace

void dequantize_rows(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld, DequantOut type) {
  if (active_isa() == CpuIsa::Avx512 && (type != DequantOut::BF16 || has_avx512_bf16())) {
    dequantize_rows_avx512(p, n0, nt, out, ld, type);
    return;
  }
  switch (type) {
    case DequantOut::F32: portable_of_type(p, n0, nt, static_cast<float*>(out), ld); break;
    case DequantOut::F16: portable_of_type(p, n0, nt, static_cast<c10::Half*>(out), ld); break;
    case DequantOut::BF16: portable_of_type(p, n0, nt, static_cast<c10::BFloat16*>(out), ld); break;
  }
}

}  // namespace saliq
