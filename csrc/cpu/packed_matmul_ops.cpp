// y = x W^T + bias with W in packed format v1 (saliq/ref.py packed_matmul), fp32 accumulation.
// Small M (<= packed_matmul_gemv_max_m(), 32 by default): the GEMV kernels of packed_gemv.h, straight on
// the packed words, through quant_linear_cpu (quant_linear_ops.cpp) without LoRA.
// Larger M (prefill): tiles of rows of W [tile, K] are dequantized (packed_prefill.h) and multiplied with
// at::mm / at::addmm (x times the tile's transpose, as F.linear does, straight into the output's columns; or, in
// the half dtypes with M below the tile's rows, the tile times x^T, then transposed into them);
// at::parallel_for over tiles, each written by one thread, whose GEMM then runs on that thread. The GEMM's
// dtype: bf16 / fp16 when x has that dtype and the CPU multiplies it natively (AVX512_BF16 / AVX512_FP16;
// oneDNN accumulates in fp32 and rounds the output once), the weight rounded once from the fp32 (q - z) * s;
// else fp32, exact up to fp32 rounding. SALIQ_CPU_PREFILL=auto|fp32|half overrides the dtype choice;
// SALIQ_CPU_PREFILL_TILE=rows the largest tile height (0: dequantize the whole weight, then one GEMM on all
// threads). Both are read per call: a prefill call takes milliseconds.
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/quant_math.h"
#include "cpu/ops.h"
#include "cpu/packed_gemv.h"
#include "cpu/packed_prefill.h"

namespace saliq {

namespace {

int64_t g_gemv_max_m = 32;  // measured crossover (docs/NOTES.md)

enum class PrefillGemm { Auto, F32, Half };

PrefillGemm prefill_gemm() {
  const char* v = std::getenv("SALIQ_CPU_PREFILL");
  if (v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0) return PrefillGemm::Auto;
  if (std::strcmp(v, "fp32") == 0) return PrefillGemm::F32;
  TORCH_CHECK_VALUE(std::strcmp(v, "half") == 0, "SALIQ_CPU_PREFILL must be auto, fp32 or half, got '", v, "'");
  return PrefillGemm::Half;
}

// Whether torch's GEMM in this dtype runs on the CPU's own bf16 / fp16 instructions. Without them oneDNN
// converts (bf16) or torch falls back to its own loops (fp16: ~2x slower than fp32 on an AVX-512 core).
bool native_half_gemm(at::ScalarType t) {
  if (t == at::kBFloat16) return has_avx512_bf16();
#if defined(__x86_64__) || defined(__i386__)
  static const bool fp16 = __builtin_cpu_supports("avx512fp16");
  if (t == at::kHalf) return fp16 && active_isa() == CpuIsa::Avx512;
#endif
  return false;
}

// The first `size` elements of a buffer kept in `slot` (thread-local at the caller) from call to call: a fresh
// buffer of megabytes costs its page faults every call. A normal tensor, usable whether or not the next caller is
// in inference mode.
at::Tensor kept_buffer(at::Tensor& slot, int64_t size, const at::TensorOptions& options) {
  if (!slot.defined() || slot.numel() < size || slot.scalar_type() != options.dtype().toScalarType()) {
    c10::InferenceMode not_inference(false);
    slot = at::Tensor();
    slot = at::empty({size}, options);
  }
  return slot.narrow(0, 0, size);
}

// Rows of W (columns of the output) per tile. Measured (docs/NOTES.md, K = 4096 and 11008): 128 beat 64 (x re-read
// per tile) and matched 256; the whole weight first, then one GEMM, was slower by 10-20 ms. A half GEMM with
// fewer than 128 rows of x takes 256 (the tile times x^T repacks x once per tile, so half as often; 2 threads,
// bf16, M = 64: 1.12-1.17 -> 1.02-1.12 bf16 F.linear; from M = 128 on 128 is as fast or faster).
int64_t prefill_tile_columns(int64_t M, bool half) {
  const char* v = std::getenv("SALIQ_CPU_PREFILL_TILE");
  if (v != nullptr && *v != 0) return std::max<int64_t>(0, std::atoll(v));
  return half && M < 128 ? 256 : 128;
}

// The tile height: at most `tile` rows (a multiple of 16 where that is smaller), in a number of tiles that is a
// multiple of the thread count, so that at::parallel_for hands every thread the same rows. With 128-row tiles a
// layer of a few tiles was split unevenly (N = 576 on two threads: 384 and 192 rows; 576 x 1536 fp32 M = 128
// took 1.27x fp32 F.linear, 0.97x in tiles of 96; docs/NOTES.md).
int64_t balanced_tile(int64_t N, int64_t tile, int64_t threads) {
  if (tile <= 0 || tile >= N) return tile;
  const int64_t tiles = (N + threads * tile - 1) / (threads * tile) * threads;
  return std::min(tile, ((N + tiles - 1) / tiles + 15) / 16 * 16);
}

// Elements from one row of a dequantized tile to the next: K rounded up to whole cache lines, plus a line where
// that count is even. Rows a power of two of lines apart (K = 4096 in bf16: 8 KiB) fall in the same L1 sets, and
// the dequantizer, which writes 16 rows side by side, then missed L1 on most of its stores (docs/NOTES.md).
int64_t tile_row_stride(int64_t K, int64_t elem) {
  const int64_t per_line = 64 / elem;
  int64_t lines = (K + per_line - 1) / per_line;
  if (lines % 2 == 0) ++lines;
  return lines * per_line;
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
  const int64_t M = x.size(0), K = in_features, N = packed_columns(qweight, scales);
  if (M > 0 && N > 0 && M <= g_gemv_max_m)  // quant_linear_cpu's GEMV path, no LoRA: the same bits either way
    return quant_linear_cpu(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, std::nullopt,
                            std::nullopt, 0.0);
  const auto xt = x.scalar_type();
  const PrefillGemm mode = prefill_gemm();  // read (and checked) for every dtype
  const bool half = (xt == at::kBFloat16 || xt == at::kHalf) &&
                    (mode == PrefillGemm::Half || (mode == PrefillGemm::Auto && native_half_gemm(xt)));
  const at::ScalarType cd = half ? xt : at::kFloat;  // the GEMM's dtype
  const DequantOut dq = !half ? DequantOut::F32 : (xt == at::kBFloat16 ? DequantOut::BF16 : DequantOut::F16);
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    bias_c = bias->to(cd).contiguous();
  }
  // the custom op (saliq/ops.py) owns autograd; the out= calls below must not record
  at::NoGradGuard no_grad;
  at::Tensor y = at::empty({M, N}, x.options().dtype(cd));
  if (M == 0 || N == 0) return y.to(xt);

  PackedGemvProblem p = packed_problem(qweight, qweight_hi, scales, zeros, bits, g, K);
  p.M = M;

  const at::Tensor xc = x.to(cd).contiguous();
  const int64_t elem = xc.element_size();
  const int64_t tile = balanced_tile(N, prefill_tile_columns(M, half), at::get_num_threads());
  const int64_t ld = tile_row_stride(K, elem);
  // inference mode and grad mode are thread-local: the worker threads must match the caller, or writing into y
  // (an inference tensor when the caller is in inference mode) fails
  const bool inference = c10::InferenceMode::is_enabled();
  if (tile == 0 || tile >= N) {  // the whole weight, then one GEMM on all threads
    thread_local at::Tensor whole;
    const at::Tensor w = kept_buffer(whole, ld * N, xc.options()).view({N, ld}).narrow(1, 0, K);
    char* base = static_cast<char*>(w.data_ptr());
    constexpr int64_t kChunk = 64;
    at::parallel_for(0, (N + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * kChunk;
        dequantize_rows(p, n0, std::min(kChunk, N - n0), base + n0 * ld * elem, ld, dq);
      }
    });
    if (bias_c.defined())
      at::addmm_out(y, bias_c, xc, w.t());
    else
      at::mm_out(y, xc, w.t());
    return y.to(xt);
  }
  // oneDNN repacks its second operand on every call; a half GEMM with fewer rows of x than the tile has takes x as
  // that operand, tile x x^T into a small buffer then transposed into y, instead of x tile^T (docs/NOTES.md:
  // bf16 M = 64, 1 thread, 2-3% to 7% faster; from M = tile rows on, slower). MKL's fp32 GEMM gained nothing.
  const bool transposed = half && M < tile;
  const int64_t tiles = (N + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode inference_guard(inference);
    at::NoGradGuard worker_no_grad;
    thread_local at::Tensor tile_buffer, out_buffer;
    const at::Tensor buf = kept_buffer(tile_buffer, ld * std::min(tile, N), xc.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, nt = std::min(tile, N - n0);
      const at::Tensor w = buf.narrow(0, 0, ld * nt).view({nt, ld}).narrow(1, 0, K);
      dequantize_rows(p, n0, nt, w.data_ptr(), ld, dq);
      at::Tensor out = y.narrow(1, n0, nt);
      if (transposed) {
        at::Tensor ot = kept_buffer(out_buffer, nt * M, xc.options()).view({nt, M});
        if (bias_c.defined())
          at::addmm_out(ot, bias_c.narrow(0, n0, nt).unsqueeze(1), w, xc.t());
        else
          at::mm_out(ot, w, xc.t());
        out.copy_(ot.t());
      } else if (bias_c.defined()) {
        at::addmm_out(out, bias_c.narrow(0, n0, nt), xc, w.t());
      } else {
        at::mm_out(out, xc, w.t());
      }
    }
  });
  return y.to(xt);
}

}  // namespace saliq
