// Portable dequantizer for the prefill GEMM (packed_prefill.h) and the choice between it and the AVX-512 one.
#include "cpu/packed_prefill.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace saliq {
namespace {

// Plain loops over j that the compiler vectorises (contiguous in and out); c10's conversions round to nearest
// even like the AVX-512 instructions. s and z of the current group are kept per column.
template <int BITS, typename OutT>
__attribute__((target_clones("avx512f", "avx2", "default"))) void columns_portable(
    const PackedGemvProblem& p, int64_t n0, int64_t nt, OutT* out, int64_t ld, float* s_row, float* z_row) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(p.qweight);
  const uint32_t* qh = reinterpret_cast<const uint32_t*>(p.qweight_hi);
  for (int64_t k = 0; k < p.K; ++k) {
    if (k % p.group_len == 0) {
      const int64_t g = k / p.group_len;
      for (int64_t j = 0; j < nt; ++j) {
        s_row[j] = load_scale(p.scales, p.scale_type, g * p.N + n0 + j);
        z_row[j] = (float)p.zeros[g * p.N + n0 + j];
      }
    }
    const uint32_t* words = qw + (k / kPerWord) * p.N + n0;
    const int shift = (int)(k % kPerWord) * kWidth;
    OutT* row = out + k * ld;
    if (BITS == 3) {
      const uint32_t* hi = qh + (k / 32) * p.N + n0;
      const int hshift = (int)(k % 32);
      for (int64_t j = 0; j < nt; ++j) {
        const uint32_t q = ((words[j] >> shift) & 3u) | (((hi[j] >> hshift) & 1u) << 2);
        row[j] = OutT(((float)(int32_t)q - z_row[j]) * s_row[j]);
      }
    } else {
      for (int64_t j = 0; j < nt; ++j) {
        const uint32_t q = (words[j] >> shift) & ((1u << kWidth) - 1u);
        row[j] = OutT(((float)(int32_t)q - z_row[j]) * s_row[j]);
      }
    }
  }
}

template <typename OutT>
void portable_of_type(const PackedGemvProblem& p, int64_t n0, int64_t nt, OutT* out, int64_t ld) {
  thread_local std::vector<float> sz;
  sz.resize(2 * nt);
  switch (p.bits) {
    case 2: columns_portable<2, OutT>(p, n0, nt, out, ld, sz.data(), sz.data() + nt); break;
    case 3: columns_portable<3, OutT>(p, n0, nt, out, ld, sz.data(), sz.data() + nt); break;
    default: columns_portable<4, OutT>(p, n0, nt, out, ld, sz.data(), sz.data() + nt); break;
  }
}

}  // namespace

void dequantize_columns(const PackedGemvProblem& p, int64_t n0, int64_t nt, void* out, int64_t ld,
                        DequantOut type) {
  if (active_isa() == CpuIsa::Avx512 && (type != DequantOut::BF16 || has_avx512_bf16())) {
    dequantize_columns_avx512(p, n0, nt, out, ld, type);
    return;
  }
  switch (type) {
    case DequantOut::F32: portable_of_type(p, n0, nt, static_cast<float*>(out), ld); break;
    case DequantOut::F16: portable_of_type(p, n0, nt, static_cast<c10::Half*>(out), ld); break;
    case DequantOut::BF16: portable_of_type(p, n0, nt, static_cast<c10::BFloat16*>(out), ld); break;
  }
}

}  // namespace saliq
