// QuantLinear's whole forward in one call: y = x What^T + lora_scale (x A^T) B^T + bias (saliq/ref.py
// packed_linear), for the CPU.
//
// Why one call: at decode (M = 1) a small model's layer takes tens of microseconds, so the separate steps the
// Python layer used to run (pad and convert x, group sums of x, the packed GEMV, x A^T, then B) cost as much in
// allocations and dispatch as in arithmetic. Here, for M <= packed_matmul_gemv_max_m():
//   1. x is converted to fp32, zero-padded to whole words, and its group sums taken, in per-thread buffers
//      that are reused from call to call (no tensor allocations but the output);
//   2. shared by the threads (work_pool.h; the caller alone for small layers, see packed_gemv_parallel): the
//      rows of t = lora_scale * x A^T [M, r], then blocks of columns, each computing y = x What^T + bias with the
//      packed GEMV kernels of packed_gemv.h and adding t B^T to the same columns.
// A and B may be fp32, bf16 or fp16 (converted while read); all sums are fp32, so the result agrees with the
// reference to fp32 rounding before the cast to x's dtype. Larger M (prefill) runs packed_matmul_cpu's tiled
// GEMM and the LoRA term as two fp32 at::mm calls. quant_linear_sliced_cpu adds a layer's reserved weights given
// as slices (sliced_sparse.h): at small M their chunks join the claimed work after the blocks, at larger M
// sliced_sparse_addmm_cpu follows the GEMM.
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu/dense_rows.h"
#include "cpu/ops.h"
#include "cpu/packed_gemv.h"
#include "cpu/work_pool.h"

namespace saliq {

namespace {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// t[m, j] = scale * sum_k A[j, k] x[m, k] for rows j in [j0, j1) (t is [M, ldt]); x rows are ldx apart; with
// `accumulate` added into t instead. The LoRA down-projection (t = scale x A^T), the up-projection (y += t B^T: A = B,
// x = t, K = r) and the dense GEMV of dense_linear_cpu (A = W, ldt = N): dense_rows.h.
template <typename T>
void dot_rows(const float* x, int64_t M, int64_t ldx, const T* A, int64_t K, int64_t ldt, float scale, int64_t j0,
              int64_t j1, float* t, bool accumulate = false) {
  constexpr DenseType type = std::is_same_v<T, c10::Half>       ? DenseType::F16
                             : std::is_same_v<T, c10::BFloat16> ? DenseType::BF16
                                                                : DenseType::F32;
  dense_rows(x, M, ldx, A, type, K, ldt, scale, j0, j1, t, accumulate);
}

// x [M, K] of any float dtype -> fp32 rows of k_padded (zero past K), and the per-group sums of x.
template <typename T>
void prepare_x(const T* x, int64_t M, int64_t K, int64_t k_padded, int64_t G, int64_t g, float* xf, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = xf + m * k_padded;
    for (int64_t k = 0; k < K; ++k) row[k] = to_float(x[m * K + k]);
    for (int64_t k = K; k < k_padded; ++k) row[k] = 0.0f;
    for (int64_t gi = 0; gi < G; ++gi) {
      float s = 0.0f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += row[k];
      xsum[m * G + gi] = s;
    }
  }
}

// The packed GEMV and the LoRA term, shared by the threads (work_pool.h): first the rows of t = scale x A^T, then
// blocks of columns, each computing x What^T + bias for its columns with the kernels of packed_gemv.h and adding
// t B^T to the same columns right away.
template <typename T>
void run(const PackedGemvProblem& p, const at::Tensor& A, const at::Tensor& B, float scale, float* t,
         const SliceProblem* sp) {
  // reused from call to call (its buffers keep their capacity); a reference, so that the other threads read the
  // caller's plan, not a thread_local of their own
  thread_local PackedGemvPlan tls_plan;
  PackedGemvPlan& plan = tls_plan;
  const int64_t r = A.defined() ? A.size(0) : 0;
  const T* a = r ? A.data_ptr<T>() : nullptr;
  const T* b = r ? B.data_ptr<T>() : nullptr;
  const int team = packed_gemv_parallel(p, r * (p.K + p.N) * (int64_t)sizeof(T)) ? at::get_num_threads() : 1;
  plan_packed_gemv(p, team, plan);
  const int64_t blocks = packed_gemv_blocks(p, plan);
  const int64_t chunks = sp ? slice_chunks(*sp) : 0;
  constexpr int64_t kRows = 8;
  const int64_t downs = (r + kRows - 1) / kRows;
  const int threads = blocks + chunks > 1 ? team : 1;
  // the reserved weights' slices: their sums go to an fp32 buffer (independent of the blocks, so any thread may
  // take a chunk once the blocks are handed out), added to y after the join
  thread_local std::vector<float> dbuf;
  float* delta = nullptr;
  if (chunks) {
    dbuf.assign(p.M * p.N, 0.0f);
    delta = dbuf.data();
  }
  // one claimed region (work_pool.h): the rows of t first, then the blocks, then the slices' chunks. A block
  // needs all of t only for its LoRA columns, after its own GEMV: by then the rows of t, claimed before it, are
  // done or nearly. The caller computes most of them while the team wakes up; a region of their own had cost a
  // second wake-up (2 threads, 2-bit 11008 x 4096, rank 64, M = 1: 0.56 -> 0.51 ms, docs/NOTES.md)
  std::atomic<int64_t> downs_left{downs};
  auto work = [&](int64_t i) {
    if (i < downs) {
      const int64_t j0 = i * kRows, j1 = std::min(r, j0 + kRows);
      dot_rows<T>(p.x, p.M, p.k_padded, a, p.K, r, scale, j0, j1, t);
      downs_left.fetch_sub(1, std::memory_order_release);
      return;
    }
    i -= downs;
    if (i >= blocks) {
      slice_chunk_sums(*sp, i - blocks, delta);
      return;
    }
    int64_t n0, n1;
    packed_gemv_block(p, plan, i, &n0, &n1);
    if (r > 0) {
      while (downs_left.load(std::memory_order_acquire) > 0) cpu_relax();
      dot_rows<T>(t, p.M, r, b, r, p.N, 1.0f, n0, n1, p.y, /*accumulate=*/true);
    }
  };
  run_claimed(downs + blocks + chunks, threads, work);
  if (chunks)
    for (int64_t i = 0; i < p.M * p.N; ++i) p.y[i] += delta[i];
}

// slices: the reserved weights' tensors (slot_ptr, slot_lanes, lane_rows, cols, vals), or null
at::Tensor quant_linear_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                             const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             int64_t in_features, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                             double lora_scale, const at::Tensor* slices) {
  check_packed(qweight, qweight_hi, scales, zeros, bits, group_size, in_features);
  const int64_t g = group_len_of(group_size, in_features, "quant_linear");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, "x must be [M, ", in_features, "], got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
                    "x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK_VALUE(lora_A.has_value() == lora_B.has_value(), "lora_A and lora_B must be given together");
  const int64_t M = x.size(0), K = in_features, N = packed_columns(qweight, scales), G = K / g;
  const bool lora = lora_A.has_value();
  int64_t r = 0;
  at::Tensor A, B;  // contiguous, one dtype (no copies when they already are)
  if (lora) {
    TORCH_CHECK_VALUE(lora_A->dim() == 2 && lora_A->size(1) == K && lora_B->dim() == 2 && lora_B->size(0) == N &&
                          lora_B->size(1) == lora_A->size(0),
                      "lora_A must be [r, ", K, "] and lora_B [", N, ", r], got ", lora_A->sizes(), " and ",
                      lora_B->sizes());
    A = lora_A->contiguous();
    B = lora_B->to(A.scalar_type()).contiguous();
    r = A.size(0);
  }

  if (M > packed_matmul_gemv_max_m() || M == 0 || N == 0) {  // prefill: packed_matmul_cpu's tiled GEMM, then LoRA
    at::Tensor y = packed_matmul_cpu(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias);
    if (lora && M > 0 && N > 0) {  // in fp32 as ref.packed_linear (r is small: cheap next to the main GEMM)
      at::NoGradGuard no_grad;
      const at::Tensor t = at::mm(x.to(at::kFloat), A.to(at::kFloat).t());
      const at::Tensor lora_term = at::mm(t, B.to(at::kFloat).t()).mul_(lora_scale);
      y.add_(lora_term.to(y.scalar_type()));
    }
    if (slices && M > 0 && N > 0)
      sliced_sparse_addmm_cpu(y, x.contiguous(), slices[0], slices[1], slices[2], slices[3], slices[4]);
    return y;
  }

  const at::Tensor xc = x.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    bias_f = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));

  // per-thread work buffers, grown as needed and kept: a decode step reuses them in every layer
  thread_local std::vector<float> xbuf, tbuf;
  const int64_t k_padded = (K + 31) / 32 * 32;
  xbuf.resize(M * k_padded + M * G);
  tbuf.resize(M * r);
  float* xf = xbuf.data();
  float* xsum = xf + M * k_padded;
  switch (xt) {
    case at::kBFloat16: prepare_x(xc.data_ptr<c10::BFloat16>(), M, K, k_padded, G, g, xf, xsum); break;
    case at::kHalf: prepare_x(xc.data_ptr<c10::Half>(), M, K, k_padded, G, g, xf, xsum); break;
    default: prepare_x(xc.data_ptr<float>(), M, K, k_padded, G, g, xf, xsum); break;
  }

  PackedGemvProblem p = packed_problem(qweight, qweight_hi, scales, zeros, bits, g, K);
  p.x = xf;
  p.x_group_sum = xsum;
  p.M = M;
  p.bias = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  p.y = y.data_ptr<float>();
  p.x_is_bf16 = xt == at::kBFloat16;
  p.x_dtype = xt == at::kBFloat16 ? 2 : (xt == at::kHalf ? 1 : 0);

  SliceProblem sp;
  if (slices) {
    sp = checked_slices(N, slices[0], slices[1], slices[2], slices[3], slices[4]);
    sp.x = xf;  // x in fp32, padded rows of k_padded
    sp.M = M;
    sp.ldx = k_padded;
  }
  const SliceProblem* spp = slices && sp.slot_ptr[sp.slices] > 0 ? &sp : nullptr;
  switch (r > 0 ? A.scalar_type() : at::kFloat) {
    case at::kFloat: run<float>(p, A, B, (float)lora_scale, tbuf.data(), spp); break;
    case at::kBFloat16: run<c10::BFloat16>(p, A, B, (float)lora_scale, tbuf.data(), spp); break;
    case at::kHalf: run<c10::Half>(p, A, B, (float)lora_scale, tbuf.data(), spp); break;
    default: TORCH_CHECK_VALUE(false, "lora_A must be float32, bfloat16 or float16, got ", A.scalar_type());
  }
  return xt == at::kFloat ? y : y.to(xt);
}

}  // namespace

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                            int64_t in_features, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                            double lora_scale) {
  return quant_linear_impl(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A, lora_B,
                           lora_scale, nullptr);
}

at::Tensor quant_linear_sliced_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qweight_hi,
                                   const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                   int64_t in_features, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                   double lora_scale, const at::Tensor& slot_ptr, const at::Tensor& slot_lanes,
                                   const at::Tensor& lane_rows, const at::Tensor& cols, const at::Tensor& vals) {
  const at::Tensor slices[5] = {slot_ptr, slot_lanes, lane_rows, cols, vals};
  return quant_linear_impl(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A, lora_B,
                           lora_scale, slices);
}

// y = x W^T + bias for a dense W [N, K] (fp32, bf16 or fp16) and small M: rows of W shared by the threads
// (work_pool.h), fp32 sums. For the layers a quantized model keeps in float (its LM head).
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() >= 1, "weight must be 2-D and x at least 1-D, got ", weight.sizes(),
                    " and ", x.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, "x must be [..., ", K, "], got ", x.sizes());
  // several rows of bf16 x on a CPU that multiplies bf16 natively: oneDNN's GEMM reads the weight once for all rows
  // at the memory's speed, where these rows, each widened to fp32, are compute-bound (4096 x 4096, M = 2-4, one
  // thread: 2.0-3.2 ms against 1.9 ms). Short rows (the demo's LM head, K = 576) stay here: 1.1-1.7x faster to M = 3.
  if (weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && x.numel() > K && K > 1024 &&
      has_avx512_bf16())
    return at::linear(x, weight, bias);
  const at::Tensor W = weight.contiguous();
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
  const float* xp = x2.data_ptr<float>();
  float* y = out.data_ptr<float>();
  constexpr int64_t kRows = 64;
  const int64_t chunks = (N + kRows - 1) / kRows;
  const int threads = N * K * (int64_t)W.element_size() >= (64 << 10) ? at::get_num_threads() : 1;
  auto rows = [&](int64_t i) {
    const int64_t j0 = i * kRows, j1 = std::min(N, j0 + kRows);
    switch (W.scalar_type()) {
      case at::kBFloat16: dot_rows(xp, M, K, W.data_ptr<c10::BFloat16>(), K, N, 1.0f, j0, j1, y); break;
      case at::kHalf: dot_rows(xp, M, K, W.data_ptr<c10::Half>(), K, N, 1.0f, j0, j1, y); break;
      default: dot_rows(xp, M, K, W.data_ptr<float>(), K, N, 1.0f, j0, j1, y); break;
    }
  };
  run_claimed(chunks, threads, rows);
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace saliq
