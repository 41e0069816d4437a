// y += x Sp^T in place, Sp the reserved weights of a quantized layer in slices of 16 rows (sliced_sparse.h; built
// from a validated CSR by saliq/sparse_slices.py csr_slices, so the contents are trusted: shapes and dtypes are
// checked). Each row sums its nonzeros in fp32 in CSR order into an fp32 buffer, then one pass makes
// y = T(float(y) + sum), as ref.sparse_addmm. Work split: chunks of slices claimed by the threads (work_pool.h);
// each writes its own rows of the buffer. quant_linear_ops.cpp runs the same chunks inside its GEMV's work.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/work_pool.h"

namespace saliq {

namespace {

constexpr int64_t kParallelWork = 32768;  // below this many slot lanes times rows of x the caller runs alone

template <class T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
void to_float(const c10::BFloat16* src, float* dst, int64_t n) {  // the high half of an fp32: a loop that vectorises
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = (uint32_t)bits[i] << 16;
}

template <class T>
void run(const at::Tensor& y, const at::Tensor& x, SliceProblem& p) {
  p.M = x.size(0);
  p.ldx = x.size(1);
  if (p.M == 0 || p.slot_ptr[p.slices] == 0) return;
  // x in fp32 and the row sums, reused from call to call (decode calls are microseconds)
  thread_local std::vector<float> xbuf, dbuf;
  if (std::is_same<T, float>::value) {
    p.x = reinterpret_cast<const float*>(x.data_ptr<T>());
  } else {
    xbuf.resize(p.M * p.ldx);
    to_float(x.data_ptr<T>(), xbuf.data(), p.M * p.ldx);
    p.x = xbuf.data();
  }
  dbuf.assign(p.M * p.N, 0.0f);  // rows without a nonzero keep 0
  float* delta = dbuf.data();
  const int64_t slots = p.slot_ptr[p.slices];
  const int threads = slots * kSliceLanes * p.M >= kParallelWork ? at::get_num_threads() : 1;
  auto chunk = [&](int64_t c) { slice_chunk_sums(p, c, delta); };
  run_claimed(slice_chunks(p), threads, chunk);
  T* yp = y.data_ptr<T>();
  for (int64_t i = 0; i < p.M * p.N; ++i) yp[i] = static_cast<T>(static_cast<float>(yp[i]) + delta[i]);
}

}  // namespace

SliceProblem checked_slices(int64_t N, const at::Tensor& slot_ptr, const at::Tensor& slot_lanes,
                            const at::Tensor& lane_rows, const at::Tensor& cols, const at::Tensor& vals) {
  SliceProblem p{};
  p.N = N;
  p.slices = (N + kSliceLanes - 1) / kSliceLanes;
  TORCH_CHECK_VALUE(slot_ptr.dim() == 1 && slot_ptr.scalar_type() == at::kInt && slot_ptr.numel() == p.slices + 1 &&
                        slot_ptr.is_contiguous() && slot_ptr.device().is_cpu(),
                    "sliced_sparse_addmm: slot_ptr must be a CPU int32 [", p.slices + 1, "] for N=", N, ", got ",
                    slot_ptr.scalar_type(), " ", slot_ptr.sizes());
  const int64_t slots = slot_lanes.numel(), expected_slots = slot_ptr.data_ptr<int32_t>()[p.slices];
  TORCH_CHECK_VALUE(slot_lanes.scalar_type() == at::kByte && slot_lanes.is_contiguous() && expected_slots == slots,
                    "sliced_sparse_addmm: slot_lanes must be uint8 [", expected_slots, "], got ",
                    slot_lanes.scalar_type(), " [", slots, "]");
  TORCH_CHECK_VALUE(lane_rows.scalar_type() == at::kInt && lane_rows.numel() == p.slices * kSliceLanes &&
                        lane_rows.is_contiguous(),
                    "sliced_sparse_addmm: lane_rows must be int32 [", p.slices * kSliceLanes, "]");
  TORCH_CHECK_VALUE((cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt) && cols.is_contiguous() &&
                        cols.numel() == slots * kSliceLanes,
                    "sliced_sparse_addmm: cols must be int16 or int32 [", slots * kSliceLanes, "]");
  TORCH_CHECK_VALUE(vals.scalar_type() == at::kFloat && vals.is_contiguous() && vals.numel() == slots * kSliceLanes,
                    "sliced_sparse_addmm: vals must be float32 [", slots * kSliceLanes, "]");
  for (const at::Tensor* t : {&slot_lanes, &lane_rows, &cols, &vals})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "sliced_sparse_addmm: the slices must be on the CPU");
  p.slot_ptr = slot_ptr.data_ptr<int32_t>();
  p.slot_lanes = slot_lanes.data_ptr<uint8_t>();
  p.lane_rows = lane_rows.data_ptr<int32_t>();
  p.cols = cols.data_ptr();
  p.cols_are_i16 = cols.scalar_type() == at::kShort;
  p.vals = vals.data_ptr<float>();
  return p;
}

at::Tensor sliced_sparse_addmm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& slot_ptr,
                                   const at::Tensor& slot_lanes, const at::Tensor& lane_rows, const at::Tensor& cols,
                                   const at::Tensor& vals) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0),
                    "sliced_sparse_addmm: x must be [M, K] and y [M, N], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                    "sliced_sparse_addmm: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(y.scalar_type() == dt && y.is_contiguous() && x.is_contiguous() && x.device().is_cpu() &&
                        y.device().is_cpu(),
                    "sliced_sparse_addmm: x and y must be contiguous CPU tensors of one dtype, got ", dt, " and ",
                    y.scalar_type());
  SliceProblem p = checked_slices(y.size(1), slot_ptr, slot_lanes, lane_rows, cols, vals);
  switch (dt) {
    case at::kHalf: run<c10::Half>(y, x, p); break;
    case at::kBFloat16: run<c10::BFloat16>(y, x, p); break;
    default: run<float>(y, x, p); break;
  }
  return y;
}

}  // namespace saliq
