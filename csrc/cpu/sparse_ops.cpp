// out = y + x Sp^T for a sparse Sp [N, K] in CSR by output row (saliq/ref.py sparse_addmm): the reserved
// weights of a quantized layer, applied right after its packed matmul.
//
// Work split: chunks of consecutive rows n holding about the same number of nonzeros (plus one unit per row),
// their boundaries found by binary search in rowptr, claimed by the threads (work_pool.h); the caller alone
// for small products. Per output element: an fp32 sum over the row's nonzeros in CSR order, then
// float(y) + sum cast once. With M = 1 the sum is kept in four interleaved partials (j mod 4, combined as
// (p0 + p1) + (p2 + p3)) so consecutive gathers do not wait on one add chain; with M > 1, x is transposed to
// fp32 [K, M] first so that one nonzero reads the M values it needs from one contiguous run.
// The CSR is checked on the way (cheap compares, no extra pass over cols): an out-of-range column or row range
// is never read out of bounds and raises an error after the pass.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/work_pool.h"

namespace saliq {

namespace {

constexpr int64_t kChunkWork = 8192;      // nonzeros (+ rows) per claimed chunk: a few microseconds
constexpr int64_t kParallelWork = 32768;  // below this many multiply-adds the caller runs alone
constexpr int kMBlock = 16;               // rows of x summed together per pass over a row's nonzeros

template <class T>
struct SparseArgs {
  const T* y;
  T* out;
  const float* x;  // M == 1: x [K] in fp32; M > 1: x^T [K, M] in fp32
  const int32_t* rowptr;
  const int32_t* cols;
  const float* vals;
  int64_t M, N, K, nnz;
};

// Loads x[c] for column c, or x[0] (a harmless in-bounds read) when c is out of range, flagging it.
inline int64_t safe_col(int32_t c, int64_t K, bool& bad) {
  const bool ok = (uint64_t)(uint32_t)c < (uint64_t)K && c >= 0;
  bad |= !ok;
  return ok ? c : 0;
}

template <class T>
void rows_m1(const SparseArgs<T>& a, int64_t n0, int64_t n1, bool& bad) {
  const float* x = a.x;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t b = a.rowptr[n], e = a.rowptr[n + 1];
    if (b < 0 || e > a.nnz || b > e) {
      bad = true;
      b = e = 0;
    }
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    int64_t j = b;
    for (; j + 4 <= e; j += 4) {
      p0 += a.vals[j] * x[safe_col(a.cols[j], a.K, bad)];
      p1 += a.vals[j + 1] * x[safe_col(a.cols[j + 1], a.K, bad)];
      p2 += a.vals[j + 2] * x[safe_col(a.cols[j + 2], a.K, bad)];
      p3 += a.vals[j + 3] * x[safe_col(a.cols[j + 3], a.K, bad)];
    }
    for (; j < e; ++j) p0 += a.vals[j] * x[safe_col(a.cols[j], a.K, bad)];
    a.out[n] = static_cast<T>(static_cast<float>(a.y[n]) + ((p0 + p1) + (p2 + p3)));
  }
}

template <class T, int MB>
inline void row_block(const SparseArgs<T>& a, int64_t n, int64_t b, int64_t e, int64_t m0, int mb, bool& bad) {
  float acc[kMBlock] = {};
  const int count = MB > 0 ? MB : mb;
  for (int64_t j = b; j < e; ++j) {
    const float v = a.vals[j];
    const float* xr = a.x + safe_col(a.cols[j], a.K, bad) * a.M + m0;
    for (int m = 0; m < count; ++m) acc[m] += v * xr[m];
  }
  for (int m = 0; m < count; ++m) {
    const int64_t i = (m0 + m) * a.N + n;
    a.out[i] = static_cast<T>(static_cast<float>(a.y[i]) + acc[m]);
  }
}

template <class T>
void rows_mn(const SparseArgs<T>& a, int64_t n0, int64_t n1, bool& bad) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t b = a.rowptr[n], e = a.rowptr[n + 1];
    if (b < 0 || e > a.nnz || b > e) {
      bad = true;
      b = e = 0;
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += kMBlock) {
      const int mb = (int)std::min<int64_t>(kMBlock, a.M - m0);
      if (mb == kMBlock)
        row_block<T, kMBlock>(a, n, b, e, m0, mb, bad);
      else
        row_block<T, 0>(a, n, b, e, m0, mb, bad);
    }
  }
}

// Chunk boundaries over rows: chunk i ends where rowptr[n] + n first reaches i / chunks of nnz + N.
std::vector<int64_t> chunk_bounds(const int32_t* rowptr, int64_t N, int64_t nnz, int64_t chunks) {
  std::vector<int64_t> bounds(chunks + 1, 0);
  const int64_t total = nnz + N;
  for (int64_t i = 1; i < chunks; ++i) {
    const int64_t target = total * i / chunks;
    int64_t lo = bounds[i - 1], hi = N;  // first n in [lo, N] with rowptr[n] + n >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if ((int64_t)rowptr[mid] + mid >= target) hi = mid; else lo = mid + 1;
    }
    bounds[i] = lo;  // never below the previous bound, so the chunks cover every row once
  }
  bounds[chunks] = N;
  return bounds;
}

template <class T>
void run(const at::Tensor& y, const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols,
         const at::Tensor& vals, at::Tensor& out) {
  SparseArgs<T> a;
  a.M = x.size(0);
  a.K = x.size(1);
  a.N = y.size(1);
  a.nnz = cols.numel();
  a.y = y.data_ptr<T>();
  a.out = out.data_ptr<T>();
  a.rowptr = rowptr.data_ptr<int32_t>();
  a.cols = cols.data_ptr<int32_t>();
  a.vals = vals.data_ptr<float>();
  if (a.M == 0 || a.N == 0) return;

  // x in fp32 in the layout the rows read; reused from call to call (decode calls are microseconds)
  thread_local std::vector<float> xbuf;
  const T* xp = x.data_ptr<T>();
  if (a.M == 1 && a.K > 0 && std::is_same<T, float>::value) {
    a.x = reinterpret_cast<const float*>(xp);
  } else {
    xbuf.resize(std::max(a.M * a.K, a.M));  // K = 0: room for the flagged reads
    float* xt = xbuf.data();
    if (a.M == 1) {
      for (int64_t k = 0; k < a.K; ++k) xt[k] = static_cast<float>(xp[k]);
    } else {
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t k = 0; k < a.K; ++k) xt[k * a.M + m] = static_cast<float>(xp[m * a.K + k]);
    }
    a.x = xt;
  }

  const int64_t work = (a.nnz + a.N) * a.M;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(a.N, (a.nnz + a.N) / kChunkWork));
  const std::vector<int64_t> bounds = chunk_bounds(a.rowptr, a.N, a.nnz, chunks);
  const int threads = work >= kParallelWork ? at::get_num_threads() : 1;
  std::atomic<bool> any_bad{false};
  auto chunk = [&](int64_t i) {
    bool bad = false;
    if (a.M == 1)
      rows_m1(a, bounds[i], bounds[i + 1], bad);
    else
      rows_mn(a, bounds[i], bounds[i + 1], bad);
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  };
  run_claimed(chunks, threads, chunk);
  TORCH_CHECK_VALUE(!any_bad.load(), "sparse_addmm: the CSR is invalid (a column outside [0, K=", a.K,
                    ") or a row range outside [0, nnz=", a.nnz, "] or decreasing); validate it with "
                    "saliq.validate.sparse_addmm_args");
}

}  // namespace

at::Tensor sparse_addmm_cpu(const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& rowptr,
                            const at::Tensor& cols, const at::Tensor& vals, const std::optional<at::Tensor>& out_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && y_in.dim() == 2, "sparse_addmm: x and y must be 2-D, got ", x_in.sizes(),
                    " and ", y_in.sizes());
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && y_in.device().is_cpu() && rowptr.device().is_cpu() &&
                        cols.device().is_cpu() && vals.device().is_cpu(),
                    "sparse_addmm (cpp): every tensor must be on the CPU");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                    "sparse_addmm: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(y_in.scalar_type() == dt, "sparse_addmm: y has dtype ", y_in.scalar_type(), "; it must be x's ",
                    dt);
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.scalar_type() == at::kInt && rowptr.numel() >= 1,
                    "sparse_addmm: rowptr must be int32 [N + 1], got ", rowptr.scalar_type(), " ", rowptr.sizes());
  TORCH_CHECK_VALUE(cols.dim() == 1 && cols.scalar_type() == at::kInt, "sparse_addmm: cols must be int32 [nnz], got ",
                    cols.scalar_type(), " ", cols.sizes());
  TORCH_CHECK_VALUE(vals.dim() == 1 && vals.scalar_type() == at::kFloat && vals.numel() == cols.numel(),
                    "sparse_addmm: vals must be float32 with the length of cols (", cols.numel(), "), got ",
                    vals.scalar_type(), " ", vals.sizes());
  const int64_t M = x_in.size(0), N = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(y_in.size(0) == M && y_in.size(1) == N, "sparse_addmm: y has shape ", y_in.sizes(),
                    "; expected [", M, ", ", N, "] (rows of x, rowptr length - 1)");
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), rp = rowptr.contiguous(), c = cols.contiguous(),
                   v = vals.contiguous();
  at::Tensor out;
  if (out_in.has_value()) {
    out = *out_in;
    TORCH_CHECK_VALUE(out.sizes() == y.sizes() && out.scalar_type() == dt && out.is_contiguous() &&
                          out.device().is_cpu(),
                      "sparse_addmm: out must be a contiguous CPU ", dt, " tensor of shape ", y.sizes());
  } else {
    out = at::empty({M, N}, y.options());
  }
  switch (dt) {
    case at::kHalf: run<c10::Half>(y, x, rp, c, v, out); break;
    case at::kBFloat16: run<c10::BFloat16>(y, x, rp, c, v, out); break;
    default: run<float>(y, x, rp, c, v, out); break;
  }
  return out;
}

}  // namespace saliq
