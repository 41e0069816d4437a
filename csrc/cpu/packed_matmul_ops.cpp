// y = x W^T + bias with W in packed format v1 (saliq/ref.py packed_matmul), fp32 accumulation.
// Small M (<= packed_matmul_gemv_max_m(), 32 by default): the GEMV kernels of packed_gemv.h, straight on
// the packed words, through quant_linear_cpu (quant_linear_ops.cpp) without LoRA.
// Larger M: column tiles of W^T are dequantized to fp32 [K, tile] (contiguous along N, like the packed
// words) and multiplied with at::mm; OpenMP (at::parallel_for) over tiles, each written by one thread.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#include "common/quant_math.h"
#include "cpu/ops.h"
#include "cpu/packed_gemv.h"

namespace saliq {

namespace {

int64_t g_gemv_max_m = 32;  // measured crossover (docs/NOTES_cpp.md)
constexpr int64_t kTileColumns = 64;

ScaleType scale_type_of(const at::Tensor& scales) {
  switch (scales.scalar_type()) {
    case at::kHalf: return ScaleType::F16;
    case at::kBFloat16: return ScaleType::BF16;
    default: return ScaleType::F32;
  }
}

// WT[k, j] = W[n0 + j, k] for j < nt, as fp32, for a tile of columns: per k, a contiguous run of packed words
// (N is contiguous) becomes a contiguous row of WT. Plain loops over j that the compiler vectorises; the
// target clones give AVX-512 / AVX2 versions chosen at load time, with the default as fallback.
template <int BITS>
__attribute__((target_clones("avx512f", "avx2", "default"))) void dequantize_transposed_tile_bits(
    const PackedGemvProblem& p, int64_t n0, int64_t nt, float* wt, float* s_row, float* z_row) {
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
    float* out = wt + k * nt;
    if (BITS == 3) {
      const uint32_t* hi = qh + (k / 32) * p.N + n0;
      const int hshift = (int)(k % 32);
      for (int64_t j = 0; j < nt; ++j) {
        const uint32_t q = ((words[j] >> shift) & 3u) | (((hi[j] >> hshift) & 1u) << 2);
        out[j] = ((float)(int32_t)q - z_row[j]) * s_row[j];
      }
    } else {
      for (int64_t j = 0; j < nt; ++j) {
        const uint32_t q = (words[j] >> shift) & ((1u << kWidth) - 1u);
        out[j] = ((float)(int32_t)q - z_row[j]) * s_row[j];
      }
    }
  }
}

void dequantize_transposed_tile(const PackedGemvProblem& p, int64_t n0, int64_t nt, float* wt) {
  float s_row[kTileColumns], z_row[kTileColumns];
  switch (p.bits) {
    case 2: dequantize_transposed_tile_bits<2>(p, n0, nt, wt, s_row, z_row); break;
    case 3: dequantize_transposed_tile_bits<3>(p, n0, nt, wt, s_row, z_row); break;
    default: dequantize_transposed_tile_bits<4>(p, n0, nt, wt, s_row, z_row); break;
  }
}

}  // namespace

int64_t packed_matmul_gemv_max_m() { return g_gemv_max_m; }
void set_packed_matmul_gemv_max_m(int64_t m) { g_gemv_max_m = m < 0 ? 0 : m; }

at::Tensor packed_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                             const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             int64_t in_features, const std::optional<at::Tensor>& bias) {
  check_packed(qweight, qweight_hi, scales, zeros, bits, group_size, in_features);
  const int64_t g = group_len_of(group_size, in_features, "packed_matmul");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, "x must be [M, ", in_features, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_floating_point(), "x must be floating point, got ", x.scalar_type());
  const int64_t M = x.size(0), K = in_features, N = qweight.size(1), G = K / g;
  if (M > 0 && N > 0 && M <= g_gemv_max_m)  // quant_linear_cpu's GEMV path, no LoRA: the same bits either way
    return quant_linear_cpu(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, std::nullopt,
                            std::nullopt, 0.0);
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());

  const int64_t k_padded = (K + 31) / 32 * 32;
  PackedGemvProblem p{};
  p.M = M;
  p.K = K;
  p.k_padded = k_padded;
  p.N = N;
  p.G = G;
  p.group_len = g;
  p.bits = (int)bits;
  p.qweight = qweight.data_ptr<int32_t>();
  p.qweight_hi = bits == 3 ? qweight_hi.data_ptr<int32_t>() : nullptr;
  p.scales = scales.data_ptr();
  p.scale_type = scale_type_of(scales);
  p.zeros = zeros.data_ptr<int16_t>();
  p.bias = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  p.y = y.data_ptr<float>();
  p.x_is_bf16 = x.scalar_type() == at::kBFloat16;

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t tiles = (N + kTileColumns - 1) / kTileColumns;
  // inference mode is thread-local: the worker threads must be in it too, or writing into y (an inference
  // tensor when the caller is) fails
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode inference_guard(inference);
    at::Tensor wt = at::empty({K, kTileColumns}, xf.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileColumns, nt = std::min(kTileColumns, N - n0);
      at::Tensor tile = wt.narrow(1, 0, nt);
      if (nt != kTileColumns) tile = at::empty({K, nt}, xf.options());
      dequantize_transposed_tile(p, n0, nt, tile.data_ptr<float>());
      at::Tensor out = at::mm(xf, tile);
      if (p.bias) out.add_(bias_f.narrow(0, n0, nt));
      y.narrow(1, n0, nt).copy_(out);
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace saliq
