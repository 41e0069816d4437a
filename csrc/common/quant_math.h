// Arithmetic shared by the CPU and CUDA kernels: packed format v1 code extraction, group dequantization,
// LWC scale / zero point, per-element fake quantization and the straight-through gradient terms.
// Every function is a scalar inline __host__ __device__ function that mirrors saliq/ref.py operation by
// operation (same fp32 operations in the same order), so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SALIQ_HD __host__ __device__ __forceinline__
#else
#define SALIQ_HD inline __attribute__((always_inline))
#endif

namespace saliq {

constexpr float kScaleMin = 1e-5f;
constexpr float kScaleMax = 1e4f;
constexpr float kZeroBound = 1e4f;
// An asymmetric scale is at least max(|xmax|, |xmin|) / 2^13 (ref.SCALE_FLOOR_FACTOR): the zero point stays
// inside +-2^13 and a constant group dequantizes to itself exactly (docs/FORMAT.md, degenerate groups).
constexpr float kScaleFloorFactor = 1.0f / 8192.0f;

SALIQ_HD int qmax_of(int bits) { return (1 << bits) - 1; }
SALIQ_HD int symmetric_half(int bits) { return (1 << (bits - 1)) - 1; }

// ------------------------------------------------------------------ packed format v1
// Width of the first plane (3-bit = a 2-bit plane + a 1-bit plane) and codes per int32 word.
SALIQ_HD int low_plane_width(int bits) { return bits == 4 ? 4 : 2; }
SALIQ_HD int codes_per_word(int width) { return 32 / width; }
SALIQ_HD int64_t packed_rows(int64_t in_features, int width) {
  const int per = 32 / width;
  return (in_features + per - 1) / per;
}

// Code `index` (0-based inside the word) of `width` bits.
SALIQ_HD uint32_t extract_code(uint32_t word, int index, int width) {
  return (word >> (index * width)) & ((1u << width) - 1u);
}

// Integer level of element (k, n) of a packed weight with N columns.
SALIQ_HD uint32_t code_at(const int32_t* qweight, const int32_t* qweight_hi, int bits, int64_t k, int64_t n,
                          int64_t N) {
  if (bits == 4) return extract_code((uint32_t)qweight[(k >> 3) * N + n], (int)(k & 7), 4);
  uint32_t q = extract_code((uint32_t)qweight[(k >> 4) * N + n], (int)(k & 15), 2);
  if (bits == 3) q |= extract_code((uint32_t)qweight_hi[(k >> 5) * N + n], (int)(k & 31), 1) << 2;
  return q;
}

// W[n, k] = (q - z) * s, in fp32 as the reference computes it.
SALIQ_HD float dequant_value(uint32_t q, float zero, float scale) { return ((float)q - zero) * scale; }

// ------------------------------------------------------------------ LWC fake quantization (1.1)
// Clamp with NaN propagation, as torch.clamp.
SALIQ_HD float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
SALIQ_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
SALIQ_HD float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

struct LwcGroup {
  float s, z, s_raw, s_lo, xmax, xmin;  // s_lo: the lower bound of s (its clamp gates gradients)
};

// Scale and zero point from the group extremes and clipping factors (ref.scale_zero).
SALIQ_HD LwcGroup lwc_scale_zero(float wmax, float wmin, float fmax, float fmin, int bits, bool symmetric) {
  LwcGroup p;
  p.xmax = fmax * wmax;
  p.xmin = fmin * wmin;
  if (symmetric) {
    const float half = (float)symmetric_half(bits);
    p.s_raw = fmaxf(fabsf(p.xmax), fabsf(p.xmin)) / half;
    p.s_lo = kScaleMin;  // s_raw >= max(|xmax|, |xmin|) / 2^13 already
    p.s = clamp_nan(p.s_raw, kScaleMin, kScaleMax);
    p.z = half;
  } else {
    p.s_raw = (p.xmax - p.xmin) / (float)qmax_of(bits);
    p.s_lo = clamp_nan(fmaxf(fabsf(p.xmax), fabsf(p.xmin)) * kScaleFloorFactor, kScaleMin, kScaleMax);
    p.s = clamp_nan(p.s_raw, p.s_lo, kScaleMax);
    p.z = rintf(clamp_nan(-p.xmin / p.s, -kZeroBound, kZeroBound));
  }
  return p;
}

struct FakeQuantElem {
  float u;     // W / s
  float r;     // round(u), half to even
  float t;     // r + z before clamping
  float q;     // clamp(t, 0, Q)
  float what;  // (q - z) * s
};

SALIQ_HD FakeQuantElem fake_quant_elem(float w, float s, float z, float qmax) {
  FakeQuantElem e;
  e.u = w / s;
  e.r = rintf(e.u);
  e.t = e.r + z;
  e.q = clamp_nan(e.t, 0.0f, qmax);
  e.what = (e.q - z) * s;
  return e;
}

// Straight-through estimator terms of one element.
SALIQ_HD bool in_range(float t, float qmax) { return t >= 0.0f && t <= qmax; }
SALIQ_HD float dwhat_ds(const FakeQuantElem& e, float z, float qmax) {
  return in_range(e.t, qmax) ? e.r - e.u : e.q - z;
}

// Gradient of the fused saliency term with respect to What: 2 * grad_reg * S * (Weff - W).
SALIQ_HD float saliency_grad(float grad_reg, float sal, float weff, float w) {
  return 2.0f * grad_reg * sal * (weff - w);
}

struct LwcGroupGrads {
  float d_xmax, d_xmin, dhi, dlo;
};

// From the group sum of grad(What) * dWhat/ds: the gradients of xmax, xmin and the clipping logits.
SALIQ_HD LwcGroupGrads lwc_group_grads(float g_s_sum, const LwcGroup& p, float wmax, float wmin, float fmax,
                                       float fmin, int bits, bool symmetric) {
  LwcGroupGrads g;
  const float unclamped = (p.s_raw >= p.s_lo && p.s_raw <= kScaleMax) ? 1.0f : 0.0f;
  const float g_s = g_s_sum * unclamped;
  if (symmetric) {
    const float g_abs = g_s / (float)symmetric_half(bits);
    const float amax = fabsf(p.xmax), amin = fabsf(p.xmin);
    const float share_max = amax > amin ? 1.0f : (amax == amin ? 0.5f : 0.0f);
    g.d_xmax = g_abs * share_max * sign_of(p.xmax);
    g.d_xmin = g_abs * (1.0f - share_max) * sign_of(p.xmin);
  } else {
    const float qmax = (float)qmax_of(bits);
    g.d_xmax = g_s / qmax;
    g.d_xmin = -g_s / qmax;
  }
  g.dhi = g.d_xmax * wmax * fmax * (1.0f - fmax);
  g.dlo = g.d_xmin * wmin * fmin * (1.0f - fmin);
  return g;
}

}  // namespace saliq
