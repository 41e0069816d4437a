// Portable small-M packed matmul: for a block of columns, walk the packed words row by row (N is
// contiguous, so a block of columns reads contiguous memory), accumulate x[k] * q per group, then apply
// y += s * (sum x q - z * sum x). Also the plan that picks the SIMD kernel at run time.
#include <algorithm>
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
          w[c] = qw[p.lo.index(r, n0 + c)];
          if (BITS == 3) h[c] = qh[p.hi.index(r >> 1, n0 + c)] >> (16 * (r & 1));
          // the CPU word order's 3-bit codes back in format v1's bits (word_order.h)
          if (BITS == 3 && p.lo.band > 1) cpu3_to_v1(w[c], h[c], &w[c], &h[c]);
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

void portable_columns(const PackedGemvProblem& p, int64_t n0, int64_t nb) {
  switch (p.bits) {
    case 2: portable_block<2>(p, n0, nb); break;
    case 3: portable_block<3>(p, n0, nb); break;
    default: portable_block<4>(p, n0, nb); break;
  }
}

void plan_packed_gemv(const PackedGemvProblem& p, int threads, PackedGemvPlan& plan) {
  const CpuIsa isa = active_isa();
  // Integer dot products on int8 digits of x unless the exact path is asked for (docs/OPS.md); a group of x
  // that is not finite takes the exact kernels, which propagate it as the reference does.
  const int parts = int8_parts_for(p);
  const bool avx512 = isa == CpuIsa::Avx512;
  const int replicas = !avx512 && p.M == 1 ? kInt8x256DigitReplicasM1 : 1;
  if (parts > 0 && quantize_activations(p, parts, replicas, plan.act)) {
    // the form for this CPU's extensions (packed_gemv_int8_avx512.h, packed_gemv_int8_avx2.h)
    const Vnni256 vnni = vnni256();
    plan.kernel = !avx512 ? (vnni == Vnni256::Vex    ? GemvKernel::Int8x256Vnni
                             : vnni == Vnni256::Evex ? GemvKernel::Int8x256VnniEvex
                                                     : GemvKernel::Int8x256)
                  : !has_avx512_vnni() ? GemvKernel::Int8x512Mad
                  : has_avx512_vbmi()  ? GemvKernel::Int8x512
                                       : GemvKernel::Int8x512NoVbmi;
    plan.block = avx512 ? int8x512_width(p, plan.kernel) : int8x256_width(p);
    const int64_t tiles = p.N / plan.block;
    // one block per thread, a second where blocks stay kInt8MinBlockColumns wide, more where y would not stay in
    // L2 (packed_gemv.h)
    const int64_t want = threads <= 1 ? 1 : std::clamp<int64_t>(p.N / kInt8MinBlockColumns, threads,
                                                                 threads * kInt8BlocksPerThread);
    const int64_t want_y = (p.M * p.N * 4 + kInt8BlockYBytes - 1) / kInt8BlockYBytes;
    plan.int8_blocks = std::min(tiles, std::max(want, want_y));
    // format v1, the next panel's rows: N words apart, so when N * 4 bytes is a multiple of 4 KiB they fall in the
    // same L1 sets and, fetched into L1 beside this panel's, evict them; there into L2 only (docs/NOTES.md). The
    // CPU word order prefetches a few KiB ahead in one stream: into L1.
    plan.act.prefetch = p.lo.band == 1 && p.N % 1024 == 0 ? PrefetchTo::kL2 : PrefetchTo::kL1;
  } else if (isa == CpuIsa::Avx512 && p.M <= 4 && p.bits != 4 && p.N >= kLutBlock) {
    plan.kernel = GemvKernel::Lut;
    plan.block = kLutBlock;
    plan.tables.resize(p.M * lut_table_floats(p));
    lut_tables(p, plan.tables.data());
  } else if (isa == CpuIsa::Avx512 && p.x_is_bf16 && has_avx512_bf16()) {
    plan.kernel = GemvKernel::Bf16;
    plan.block = kBf16Block;
    plan.pairs.resize(p.M * (p.k_padded / 2));
    bf16_pairs(p, plan.pairs.data());
  } else if (isa == CpuIsa::Avx512) {
    plan.kernel = GemvKernel::Fma512;
    plan.block = kFma512Block;
  } else if (isa == CpuIsa::Avx2) {
    plan.kernel = GemvKernel::Fma256;
    plan.block = kFma256Block;
  } else {
    plan.kernel = GemvKernel::Portable;
    plan.block = kPortableBlock;
  }
  plan.main_columns = p.N / plan.block * plan.block;
  if (plan.kernel < GemvKernel::Int8x512) plan.int8_blocks = 0;  // the int8 kernels come last in GemvKernel
}

int64_t packed_gemv_blocks(const PackedGemvProblem& p, const PackedGemvPlan& plan) {
  const int64_t main_blocks = plan.int8_blocks ? plan.int8_blocks : plan.main_columns / plan.block;
  return main_blocks + (p.N - plan.main_columns + kPortableBlock - 1) / kPortableBlock;
}

void packed_gemv_block(const PackedGemvProblem& p, const PackedGemvPlan& plan, int64_t b, int64_t* n0,
                       int64_t* n1) {
  const int64_t main_blocks = plan.int8_blocks ? plan.int8_blocks : plan.main_columns / plan.block;
  if (b >= main_blocks) {  // the columns past the last whole block of the main kernel
    *n0 = plan.main_columns + (b - main_blocks) * kPortableBlock;
    *n1 = *n0 + kPortableBlock < p.N ? *n0 + kPortableBlock : p.N;
    portable_columns(p, *n0, *n1 - *n0);
    return;
  }
  if (plan.int8_blocks) {  // block b: tiles [b T / B, (b + 1) T / B) of the T whole tiles, B blocks
    const int64_t tiles = plan.main_columns / plan.block;
    const int64_t t0 = b * tiles / plan.int8_blocks, t1 = (b + 1) * tiles / plan.int8_blocks;
    *n0 = t0 * plan.block;
    *n1 = t1 * plan.block;
    switch (plan.kernel) {
      case GemvKernel::Int8x512: int8x512_columns(p, plan.act, *n0, t1 - t0); break;
      case GemvKernel::Int8x512NoVbmi: int8x512_novbmi_columns(p, plan.act, *n0, t1 - t0); break;
      case GemvKernel::Int8x512Mad: int8x512_mad_columns(p, plan.act, *n0, t1 - t0); break;
      case GemvKernel::Int8x256Vnni: int8x256_vnni_columns(p, plan.act, *n0, t1 - t0); break;
      case GemvKernel::Int8x256VnniEvex: int8x256_vnni_evex_columns(p, plan.act, *n0, t1 - t0); break;
      default: int8x256_columns(p, plan.act, *n0, t1 - t0); break;
    }
    return;
  }
  *n0 = b * plan.block;
  *n1 = *n0 + plan.block;
  switch (plan.kernel) {
    case GemvKernel::Lut: lut_columns(p, plan.tables.data(), *n0); break;
    case GemvKernel::Bf16: bf16_columns(p, plan.pairs.data(), *n0); break;
    case GemvKernel::Fma512: fma512_columns(p, *n0); break;
    case GemvKernel::Fma256: fma256_columns(p, *n0); break;
    default: portable_columns(p, *n0, plan.block); break;
  }
}

bool packed_gemv_parallel(const PackedGemvProblem& p, int64_t extra_bytes) {
  // Below ~64 KiB of weights (and LoRA factors) a layer takes a few microseconds on one thread: handing out
  // blocks to another costs about as much.
  constexpr int64_t kParallelBytes = 64 << 10;
  const int64_t weight_bytes = p.N * p.K * (p.bits == 3 ? 3 : p.bits) / 8 + p.G * p.N * 6;
  return p.M * weight_bytes + extra_bytes >= kParallelBytes;
}

}  // namespace saliq
