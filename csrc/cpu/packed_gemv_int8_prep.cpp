// Activation quantization for the integer-dot-product GEMV (packed_gemv_int8.h): per row of x and weight group,
// x ~= unit * Q, Q an integer of |Q| <= Qmax split into `parts` int8 digits of base 256
// (Q = sum_p 256^(parts-1-p) part_p), so that the kernel's int32 dot products of codes and digits are exact and
// the only error is the rounding of x to the grid unit = max|x_group| / Qmax (relative to the group's largest
// element: 2^-8 for one part, 2^-16 for two, 2^-24 for three; docs/OPS.md).
// The digits are arranged in the order the shifted and masked weight words hold the codes: byte b of the word
// shifted by j * width is the code of k = r * per_word + b * (per_word / 4) + j.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/packed_gemv.h"

namespace saliq {

namespace {

typedef uint8_t Bytes16 __attribute__((vector_size(16)));

// 16 digits -> their 4 operands: result byte 4 o + b is byte b of operand o, i.e. digit b * J + j of its word row
// (o = j; with 8 digits a row, o = 2 r + j for rows r = 0, 1). One pshufb where the clone has SSSE3.
template <int PW>
inline __attribute__((always_inline)) Bytes16 operands_of(Bytes16 d) {
  static_assert(PW == 8 || PW == 16, "16 digits hold whole word rows");
#if defined(__clang__)
  if constexpr (PW == 16) return __builtin_shufflevector(d, d, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  else return __builtin_shufflevector(d, d, 0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
#else
  if constexpr (PW == 16) return __builtin_shuffle(d, Bytes16{0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15});
  else return __builtin_shuffle(d, Bytes16{0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15});
#endif
}

// Operands of one plane: out[r * J + j] holds the digits of k = r * per_word + b * J + j in byte b (J = per_word / 4),
// a byte transpose of each 16 digits (operands_of); the scalar gather it replaced took two thirds of the ~27 us of
// a K = 11008 call. Each operand is written `replicas` times in a row.
template <int PW>
__attribute__((target_clones("avx2", "default"))) void arrange_pw(const int8_t* digits, int64_t k_padded,
                                                                   int replicas, int32_t* out) {
  const int64_t n16 = k_padded / 16;  // k_padded is a multiple of 32
  for (int64_t i = 0; i < n16; ++i) {
    Bytes16 d;
    std::memcpy(&d, digits + i * 16, 16);
    const Bytes16 t = operands_of<PW>(d);
    if (replicas == 1) {
      std::memcpy(out + i * 4, &t, 16);
    } else {
      int32_t v[4];
      std::memcpy(v, &t, 16);
      for (int o = 0; o < 4; ++o)
        for (int c = 0; c < replicas; ++c) out[(i * 4 + o) * replicas + c] = v[o];
    }
  }
}

void arrange(const int8_t* digits, int64_t k_padded, int per_word, int replicas, int32_t* out) {
  switch (per_word) {
    case 8: arrange_pw<8>(digits, k_padded, replicas, out); break;
    default: arrange_pw<16>(digits, k_padded, replicas, out); break;
  }
}

}  // namespace

int int8_parts_for(const PackedGemvProblem& p) {
  if (active_isa() == CpuIsa::Portable) return 0;
  // a group's accumulators end on a whole word of every plane (groups are 32, 64, 128 or all of K)
  if (p.G > 1 && p.group_len % 32 != 0) return 0;
  const GemvPrecision precision = gemv_precision();
  if (precision != GemvPrecision::Auto) return (int)precision;
  // Auto: the digits that keep each dtype inside its tolerance with room to spare (docs/OPS.md): fp32 three
  // (2^-24 of the group maximum, like fp32 rounding), fp16 / bf16 two (2^-16, below their own rounding).
  const int parts = p.x_dtype == 0 ? 3 : 2;
  // Without AVX-512 VNNI (the AVX2, 256-bit VNNI and AVX-512 BW forms) three digits leave one row per tile: from
  // three rows of fp32 x the exact kernel, which shares each unpacked code among the rows, is as fast or faster
  // (docs/NOTES.md: the 256-bit VNNI form too, 2-bit M = 4 5.52 against 4.43 ms); two digits stay ahead up to
  // M = 16.
  if (parts == 3 && p.M > 2 && !has_avx512_vnni()) return 0;
  return parts;
}

namespace {

// One row of x: per group the grid unit and Q = rint(x / unit) (clamped: x * (Qmax / amax) may round above
// Qmax); then the digits, most significant first. Loops the compiler vectorises (target clones).
template <int P>
__attribute__((target_clones("avx512f", "avx2", "default"))) bool quantize_row(
    const float* x, int64_t G, int64_t group_len, int64_t kp, float* unit, int32_t* q, int8_t* digits,
    float* part_sum) {
  constexpr int32_t qmax = kInt8Qmax[P];
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * group_len;
    float amax = 0.0f, nonfinite = 0.0f;  // x - x is NaN exactly for inf and NaN (max would drop a NaN)
#pragma omp simd reduction(max : amax) reduction(+ : nonfinite)
    for (int64_t k = 0; k < group_len; ++k) {
      amax = std::max(amax, std::fabs(xg[k]));
      nonfinite += xg[k] - xg[k];
    }
    if (nonfinite != 0.0f || !(amax <= 3.4e38f)) return false;  // the exact kernels propagate it
    const float inv = amax > 0.0f ? (float)qmax / amax : 0.0f;
    if (amax > 0.0f && !(inv <= 3.4e38f)) return false;  // subnormal extremes: exact path
    unit[g] = amax / (float)qmax;
    int32_t* qg = q + g * group_len;
#pragma omp simd
    for (int64_t k = 0; k < group_len; ++k) {
      const float v = std::min(std::max(__builtin_rintf(xg[k] * inv), (float)-qmax), (float)qmax);
      qg[k] = (int32_t)v;
    }
  }
  // the carry 128 (+ 128 * 256) makes every lower digit land in [-128, 127]; per group the sum of each plane's
  // digits (part_sum[g * P + plane], plane 0 the top digit)
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * group_len;
    int32_t s_top = 0, s_mid = 0, s_low = 0;
#pragma omp simd reduction(+ : s_top, s_mid, s_low)
    for (int64_t k = k0; k < k0 + group_len; ++k) {
      int32_t rest = q[k];
      if (P == 3) {
        const int32_t top = (rest + 32896) >> 16;
        digits[k] = (int8_t)top;
        rest -= top << 16;
        s_top += top;
      }
      if (P >= 2) {
        const int32_t top = (rest + 128) >> 8;
        digits[(P - 2) * kp + k] = (int8_t)top;
        rest -= top << 8;
        s_mid += top;
      }
      digits[(P - 1) * kp + k] = (int8_t)rest;
      s_low += rest;
    }
    float* sums = part_sum + g * P;
    if (P == 3) *sums++ = (float)s_top;
    if (P >= 2) *sums++ = (float)s_mid;
    *sums = (float)s_low;
  }
  for (int d = 0; d < P; ++d)  // padding past K
    for (int64_t k = G * group_len; k < kp; ++k) digits[d * kp + k] = 0;
  return true;
}

}  // namespace

bool quantize_activations(const PackedGemvProblem& p, int parts, int replicas, Int8Activations& act) {
  const int64_t kp = p.k_padded, ops = kp / 4 * replicas;
  act.parts = parts;
  act.replicas = replicas;
  act.operands.resize(p.M * parts * ops);
  act.unit.resize(p.M * p.G);
  act.part_sum.resize(p.M * p.G * parts);
  thread_local std::vector<int32_t> q;
  thread_local std::vector<int8_t> digits;
  q.resize(kp);
  digits.resize(parts * kp);
  const int per_word = p.bits == 4 ? 8 : 16;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * kp;
    float* unit = act.unit.data() + m * p.G;
    float* part_sum = act.part_sum.data() + m * p.G * parts;
    bool ok = false;
    switch (parts) {
      case 1: ok = quantize_row<1>(x, p.G, p.group_len, kp, unit, q.data(), digits.data(), part_sum); break;
      case 2: ok = quantize_row<2>(x, p.G, p.group_len, kp, unit, q.data(), digits.data(), part_sum); break;
      default: ok = quantize_row<3>(x, p.G, p.group_len, kp, unit, q.data(), digits.data(), part_sum); break;
    }
    if (!ok) return false;
    for (int d = 0; d < parts; ++d) {
      arrange(digits.data() + d * kp, kp, per_word, replicas, act.operands.data() + (m * parts + d) * ops);
    }
  }
  return true;
}

}  // namespace saliq
