// Portable small-M packed matmul: for a block of columns, walk the packed words row by row (N is
// contiguous, so a block of columns reads contiguous memory), accumulate x[k] * q per group, then apply
// y += s * (sum x q - z * sum x). Also the dispatcher that picks the SIMD path at run time.
#include <cstring>
#include <vector>

#include "cpu/packed_gemv.h"

namespace saliq {

float load_scale(const void* scales, ScaleType type, int64_t index) {
  if (type == ScaleType::F32) return static_cast<const float*>(scales)[index];
  const uint16_t h = static_cast<const uint16_t*>(scales)[index];
  if (type == ScaleType::BF16) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  // IEEE half -> float
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

// One block of up to kBlock columns, all rows of x: per word row, the codes of the block's columns are read
// from contiguous words; the inner loop over columns is plain enough for the compiler to vectorise.
template <int BITS>
void portable_block(const PackedGemvProblem& p, int64_t n0, int64_t nb) {
  constexpr int64_t kBlock = 16;
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(p.qweight);
  const uint32_t* qh = reinterpret_cast<const uint32_t*>(p.qweight_hi);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.k_padded;
    float y[kBlock] = {0};
    for (int64_t g = 0; g < p.G; ++g) {
      float acc[kBlock] = {0};
      const int64_t r_begin = g * p.group_len / kPerWord;
      const int64_t r_end = ((g + 1) * p.group_len + kPerWord - 1) / kPerWord;
      for (int64_t r = r_begin; r < r_end; ++r) {
        uint32_t w[kBlock] = {0}, h[kBlock] = {0};
        for (int64_t c = 0; c < nb; ++c) {
          w[c] = qw[r * p.N + n0 + c];
          if (BITS == 3) h[c] = qh[(r >> 1) * p.N + n0 + c] >> (16 * (r & 1));
        }
        for (int j = 0; j < kPerWord; ++j) {
          const float xk = x[r * kPerWord + j];
          for (int64_t c = 0; c < kBlock; ++c) {
            uint32_t q = (w[c] >> (j * kWidth)) & ((1u << kWidth) - 1u);
            if (BITS == 3) q |= ((h[c] >> j) & 1u) << 2;
            acc[c] += xk * (float)(int32_t)q;
          }
        }
      }
      const float xs = p.x_group_sum[m * p.G + g];
      for (int64_t c = 0; c < nb; ++c) {
        const float s = load_scale(p.scales, p.scale_type, g * p.N + n0 + c);
        const float z = (float)p.zeros[g * p.N + n0 + c];
        y[c] += s * (acc[c] - z * xs);
      }
    }
    for (int64_t c = 0; c < nb; ++c) p.y[m * p.N + n0 + c] = y[c] + (p.bias ? p.bias[n0 + c] : 0.0f);
  }
}

}  // namespace

void packed_gemv_portable(const PackedGemvProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int64_t kBlock = 16;
  const int64_t n_blocks = (n_end - n_begin + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t n0 = n_begin + b * kBlock;
    const int64_t nb = (n_end - n0) < kBlock ? (n_end - n0) : kBlock;
    switch (p.bits) {
      case 2: portable_block<2>(p, n0, nb); break;
      case 3: portable_block<3>(p, n0, nb); break;
      default: portable_block<4>(p, n0, nb); break;
    }
  }
}

void packed_gemv(const PackedGemvProblem& p) {
  int64_t done = 0;
  const CpuIsa isa = active_isa();
  if (isa == CpuIsa::Avx512) {
    done = packed_gemv_avx512(p);
  } else if (isa == CpuIsa::Avx2) {
    done = packed_gemv_avx2(p);
  }
  if (done < p.N) packed_gemv_portable(p, done, p.N);
}

}  // namespace saliq
