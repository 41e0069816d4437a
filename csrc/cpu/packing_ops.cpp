// Packed format v1 on the CPU: pack, unpack and dequantize (bit-exact with saliq/packing.py and
// saliq/ref.py dequantize), plus the argument checks every packed op shares.
// Work split: OpenMP over word rows (pack) or over blocks of 16 output rows n (unpack, dequantize).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#include "common/quant_math.h"
#include "cpu/ops.h"
#include "cpu/word_order.h"

namespace saliq {

void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "bits=", bits, " is not supported; allowed: (2, 3, 4)");
}

int64_t group_len_of(int64_t group_size, int64_t in_features, const char* where) {
  TORCH_CHECK_VALUE(in_features > 0, where, ": in_features=", in_features, " must be positive");
  TORCH_CHECK_VALUE(group_size == -1 || group_size == 32 || group_size == 64 || group_size == 128, where,
                    ": group_size=", group_size, " is not supported; allowed: (32, 64, 128, -1)");
  const int64_t g = group_size == -1 ? in_features : group_size;
  TORCH_CHECK_VALUE(in_features % g == 0, where, ": group_size=", group_size, " does not divide in_features=",
                    in_features);
  return g;
}

PackedGemvProblem packed_problem(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t group_len, int64_t in_features) {
  PackedGemvProblem p{};
  p.K = in_features;
  p.k_padded = (in_features + 31) / 32 * 32;
  p.N = packed_columns(qweight, scales);
  p.G = in_features / group_len;
  p.group_len = group_len;
  p.bits = (int)bits;
  p.qweight = qweight.data_ptr<int32_t>();
  p.qweight_hi = bits == 3 ? qweight_hi.data_ptr<int32_t>() : nullptr;
  p.lo = plane_order(qweight, in_features, low_plane_width((int)bits), p.N);
  if (bits == 3) p.hi = plane_order(qweight_hi, in_features, 1, p.N);
  p.scales = scales.data_ptr();
  p.scale_type = scales.scalar_type() == at::kHalf       ? ScaleType::F16
                 : scales.scalar_type() == at::kBFloat16 ? ScaleType::BF16
                                                        : ScaleType::F32;
  p.zeros = zeros.data_ptr<int16_t>();
  return p;
}

int64_t packed_columns(const at::Tensor& qweight, const at::Tensor& scales) {
  return qweight.dim() == 1 && scales.dim() == 2 ? scales.size(1) : qweight.size(qweight.dim() - 1);
}

PlaneOrder plane_order(const at::Tensor& words, int64_t in_features, int width, int64_t n) {
  PlaneOrder o;
  o.N = n;
  o.rows = packed_rows(in_features, width);
  o.band = words.dim() == 1 ? cpu_order_band(width) : 1;
  return o;
}

void check_packed(const at::Tensor& qweight, const at::Tensor& qweight_hi, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features) {
  check_bits(bits);
  const int64_t g = group_len_of(group_size, in_features, "packed weight");
  TORCH_CHECK_VALUE((qweight.dim() == 2 || qweight.dim() == 1) && qweight.scalar_type() == at::kInt,
                    "qweight must be an int32 tensor, 2-D (format v1) or 1-D (the CPU word order), got ",
                    qweight.scalar_type(), " ", qweight.sizes());
  const int64_t rows = packed_rows(in_features, low_plane_width((int)bits));
  // the CPU word order (word_order.h) keeps the words of [rows, N] in one dimension: N comes from the scales
  const bool cpu_order = qweight.dim() == 1;
  const int64_t n = packed_columns(qweight, scales);
  if (cpu_order) {
    TORCH_CHECK_VALUE(qweight.numel() == rows * n, "qweight in the CPU word order has ", qweight.numel(),
                      " words; ", bits, "-bit in_features=", in_features, " and ", n, " columns need ", rows * n);
  } else {
    TORCH_CHECK_VALUE(qweight.size(0) == rows, "qweight has ", qweight.size(0), " rows; ", bits,
                      "-bit in_features=", in_features, " needs ", rows);
  }
  if (bits == 3) {
    const int64_t hi_rows = packed_rows(in_features, 1);
    const bool ok = cpu_order ? qweight_hi.dim() == 1 && qweight_hi.numel() == hi_rows * n
                              : qweight_hi.dim() == 2 && qweight_hi.size(0) == hi_rows && qweight_hi.size(1) == n;
    TORCH_CHECK_VALUE(ok && qweight_hi.scalar_type() == at::kInt, "qweight_hi must be int32 ",
                      cpu_order ? "[" + std::to_string(hi_rows * n) + "] (the CPU word order, as qweight)"
                                : "[" + std::to_string(hi_rows) + ", " + std::to_string(n) + "]",
                      ", got ", qweight_hi.sizes());
    TORCH_CHECK_VALUE(qweight_hi.is_contiguous(), "qweight_hi must be contiguous");
  }
  const int64_t groups = in_features / g;
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == n, "scales must be [",
                    groups, ", ", n, "], got ", scales.sizes());
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf ||
                        scales.scalar_type() == at::kBFloat16,
                    "scales must be float32, float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(zeros.scalar_type() == at::kShort && zeros.sizes() == scales.sizes(),
                    "zeros must be int16 with the shape of scales ", scales.sizes(), ", got ", zeros.scalar_type(),
                    " ", zeros.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(),
                    "qweight, scales and zeros must be contiguous");
}

namespace {

void pack_plane(const int32_t* q, int64_t n, int64_t k, int width, int shift, int32_t* out) {
  const int per = 32 / width;
  const int64_t rows = packed_rows(k, width);
  const uint32_t mask = (1u << width) - 1u;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < n; ++j) {
        uint32_t word = 0;
        const int64_t kend = std::min<int64_t>(k, (r + 1) * per);
        for (int64_t kk = r * per; kk < kend; ++kk)
          word |= (((uint32_t)q[j * k + kk] >> shift) & mask) << ((kk - r * per) * width);
        out[r * n + j] = (int32_t)word;
      }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& q_in, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_VALUE(q_in.dim() == 2, "q must be 2-D [out_features, in_features], got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(!q_in.is_floating_point() && q_in.scalar_type() != at::kBool, "q must hold integers, got dtype ",
                    q_in.scalar_type());
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "q must be a CPU tensor");
  const int64_t qmax = (1 << bits) - 1;
  if (q_in.numel()) {
    const int64_t lo = q_in.min().item<int64_t>(), hi = q_in.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= qmax, "q holds values in [", lo, ", ", hi, "]; ", bits, "-bit allows [0, ",
                      qmax, "]");
  }
  const at::Tensor q = q_in.to(at::kInt).contiguous();
  const int64_t n = q.size(0), k = q.size(1);
  const int low = low_plane_width((int)bits);
  at::Tensor qweight = at::empty({packed_rows(k, low), n}, q.options().dtype(at::kInt));
  pack_plane(q.data_ptr<int32_t>(), n, k, low, 0, qweight.data_ptr<int32_t>());
  at::Tensor qweight_hi;
  if (bits == 3) {
    qweight_hi = at::empty({packed_rows(k, 1), n}, q.options().dtype(at::kInt));
    pack_plane(q.data_ptr<int32_t>(), n, k, 1, 2, qweight_hi.data_ptr<int32_t>());
  } else {
    qweight_hi = at::empty({0}, q.options().dtype(at::kInt));
  }
  return {qweight, qweight_hi};
}

// Calls fn(n, k, q) for every element of rows [n0, n1); the inner loops walk packed words along N.
template <class Fn>
static void for_each_code(const int32_t* qw, const int32_t* qh, int bits, int64_t n_total, int64_t k_total,
                          int64_t n0, int64_t n1, Fn&& fn) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < k_total; ++k) fn(n, k, code_at(qw, qh, bits, k, n, n_total));
}

// A plane in the CPU word order (1-D) copied back to format v1 [rows, n]; a 2-D plane as it is.
static at::Tensor words_to_v1(const at::Tensor& words, int64_t in_features, int width, int64_t n) {
  if (words.dim() != 1) return words;
  const PlaneOrder o = plane_order(words, in_features, width, n);
  TORCH_CHECK_VALUE(words.numel() == o.rows * n && words.is_contiguous(), "words in the CPU word order must be ",
                    o.rows * n, " contiguous int32, got ", words.sizes());
  at::Tensor out = at::empty({o.rows, n}, words.options());
  const int32_t* src = words.data_ptr<int32_t>();
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, o.rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < n; ++j) dst[r * n + j] = src[o.index(r, j)];
  });
  return out;
}

// 3-bit planes [rows, n] / [ceil(rows / 2), n] (contiguous) between format v1's bits and the CPU word order's
// (word_order.h), a hi word (two word rows) at a time, each loop along n vectorised; in place when the outputs are
// the inputs.
template <bool INTO_CPU_LAYOUT>
static void repack3_rows(const uint32_t* w, const uint32_t* h, uint32_t* w_out, uint32_t* h_out, int64_t rows,
                         int64_t n) {
  const auto convert = [](uint32_t word, uint32_t h16, uint32_t* word_out, uint32_t* h16_out) {
    if (INTO_CPU_LAYOUT) cpu3_from_v1(word, h16, word_out, h16_out);
    else cpu3_to_v1(word, h16, word_out, h16_out);
  };
  at::parallel_for(0, (rows + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t r = 2 * q;
      // each j reads its own words before it writes them (in place too): no dependence between iterations
      if (r + 1 < rows) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t hw = h[q * n + j];
          uint32_t a, b, ha, hb;
          convert(w[r * n + j], hw, &a, &ha);
          convert(w[(r + 1) * n + j], hw >> 16, &b, &hb);
          w_out[r * n + j] = a;
          w_out[(r + 1) * n + j] = b;
          h_out[q * n + j] = ha | (hb << 16);
        }
      } else {  // the last word row, alone in its hi word
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          uint32_t a, ha;
          convert(w[r * n + j], h[q * n + j], &a, &ha);
          w_out[r * n + j] = a;
          h_out[q * n + j] = ha;
        }
      }
    }
  });
}

static void repack3_rows(const uint32_t* w, const uint32_t* h, uint32_t* w_out, uint32_t* h_out, int64_t rows,
                         int64_t n, bool into_cpu_layout) {
  if (into_cpu_layout) repack3_rows<true>(w, h, w_out, h_out, rows, n);
  else repack3_rows<false>(w, h, w_out, h_out, rows, n);
}

std::tuple<at::Tensor, at::Tensor> repack3_cpu(const at::Tensor& lo, const at::Tensor& hi, bool into_cpu_layout) {
  TORCH_CHECK_VALUE(lo.dim() == 2 && lo.scalar_type() == at::kInt && lo.device().is_cpu(),
                    "lo must be a 2-D int32 CPU tensor, got ", lo.scalar_type(), " ", lo.sizes());
  const int64_t rows = lo.size(0), n = lo.size(1);
  TORCH_CHECK_VALUE(hi.dim() == 2 && hi.scalar_type() == at::kInt && hi.device().is_cpu() &&
                        hi.size(0) == (rows + 1) / 2 && hi.size(1) == n,
                    "hi must be a 2-D int32 CPU tensor [", (rows + 1) / 2, ", ", n, "], got ", hi.sizes());
  const at::Tensor l = lo.contiguous(), h = hi.contiguous();
  at::Tensor lo_out = at::empty_like(l), hi_out = at::empty_like(h);
  repack3_rows(reinterpret_cast<const uint32_t*>(l.data_ptr<int32_t>()),
               reinterpret_cast<const uint32_t*>(h.data_ptr<int32_t>()),
               reinterpret_cast<uint32_t*>(lo_out.data_ptr<int32_t>()),
               reinterpret_cast<uint32_t*>(hi_out.data_ptr<int32_t>()), rows, n, into_cpu_layout);
  return {lo_out, hi_out};
}

std::pair<at::Tensor, at::Tensor> planes_to_v1(const at::Tensor& qweight, const at::Tensor& qweight_hi, int bits,
                                               int64_t in_features, int64_t n) {
  at::Tensor lo = words_to_v1(qweight, in_features, low_plane_width(bits), n);
  if (bits != 3 || qweight.dim() != 1) return {lo, bits == 3 ? words_to_v1(qweight_hi, in_features, 1, n) : qweight_hi};
  TORCH_CHECK_VALUE(qweight_hi.dim() == 1, "qweight_hi must be in the CPU word order (1-D) as qweight is, got ",
                    qweight_hi.sizes());
  at::Tensor hi = words_to_v1(qweight_hi, in_features, 1, n);
  // the 3-bit codes back in format v1's bits, in place (lo and hi are new tensors)
  uint32_t* w = reinterpret_cast<uint32_t*>(lo.data_ptr<int32_t>());
  uint32_t* h = reinterpret_cast<uint32_t*>(hi.data_ptr<int32_t>());
  repack3_rows(w, h, w, h, lo.size(0), n, false);
  return {lo, hi};
}

at::Tensor unpack_cpu(const at::Tensor& qweight_in, const at::Tensor& qweight_hi_in, int64_t bits,
                      int64_t in_features) {
  check_bits(bits);
  TORCH_CHECK_VALUE(in_features > 0, "in_features=", in_features, " must be positive");
  // 1-D: the CPU word order; its columns follow from the word count
  const int64_t lo_rows = packed_rows(in_features, low_plane_width((int)bits));
  TORCH_CHECK_VALUE(qweight_in.dim() != 1 || qweight_in.numel() % lo_rows == 0, "qweight in the CPU word order has ",
                    qweight_in.numel(), " words, not a multiple of the ", lo_rows, " word rows of in_features=",
                    in_features);
  const int64_t n1 = qweight_in.dim() == 1 ? qweight_in.numel() / lo_rows : 0;
  const auto [qweight, qweight_hi] = planes_to_v1(qweight_in, qweight_hi_in, (int)bits, in_features, n1);
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "qweight must be a 2-D int32 tensor");
  TORCH_CHECK_VALUE(qweight.size(0) >= packed_rows(in_features, low_plane_width((int)bits)), "qweight has ",
                    qweight.size(0), " rows, too few for in_features=", in_features);
  const at::Tensor qw = qweight.contiguous();
  const int64_t n = qw.size(1);
  at::Tensor qh = qweight_hi;
  if (bits == 3) {
    TORCH_CHECK_VALUE(qweight_hi.dim() == 2 && qweight_hi.size(1) == n &&
                          qweight_hi.size(0) >= packed_rows(in_features, 1),
                      "qweight_hi must be int32 [", packed_rows(in_features, 1), ", ", n, "]");
    qh = qweight_hi.contiguous();
  }
  at::Tensor out = at::empty({n, in_features}, qw.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const int32_t* qwp = qw.data_ptr<int32_t>();
  const int32_t* qhp = bits == 3 ? qh.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for_each_code(qwp, qhp, (int)bits, n, in_features, n0, n1,
                  [&](int64_t j, int64_t k, uint32_t q) { o[j * in_features + k] = (uint8_t)q; });
  });
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& qweight_in, const at::Tensor& qweight_hi_in, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features) {
  check_packed(qweight_in, qweight_hi_in, scales, zeros, bits, group_size, in_features);
  const int64_t g = group_len_of(group_size, in_features, "dequantize");
  const int64_t n = scales.size(1);
  const auto [qweight, qweight_hi] = planes_to_v1(qweight_in, qweight_hi_in, (int)bits, in_features, n);
  at::Tensor out = at::empty({n, in_features}, scales.options());
  const int32_t* qwp = qweight.data_ptr<int32_t>();
  const int32_t* qhp = bits == 3 ? qweight_hi.data_ptr<int32_t>() : nullptr;
  const int16_t* zp = zeros.data_ptr<int16_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "dequantize_cpu", [&] {
    const scalar_t* sp = scales.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
      for_each_code(qwp, qhp, (int)bits, n, in_features, n0, n1, [&](int64_t j, int64_t k, uint32_t q) {
        const int64_t idx = (k / g) * n + j;
        o[j * in_features + k] = (scalar_t)dequant_value(q, (float)zp[idx], (float)sp[idx]);
      });
    });
  });
  return out;
}

}  // namespace saliq
