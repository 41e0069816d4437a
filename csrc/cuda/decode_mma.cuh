// Decode kernel y[M, N] = x[M, K] W^T + bias for M = 1..16 rows of fp16 / bf16 activations, W in packed format
// v1 (docs/FORMAT.md), on the tensor cores: mma.sync m16n8k16 with fp32 accumulation. Included by the
// decode_mma_b{2,3,4}.cu files, which instantiate it per bit width (nvcc builds them in parallel).
//
// Why tensor cores for a GEMV: at H100/H200 bandwidth an SM receives ~16 bytes per clock and issues at most
// 4 warp-instructions per clock, so a 2-bit kernel has ~1 warp-instruction per 16 weights. One mma takes 256
// weights of a warp; what remains per weight pair is one lop3 (bits -> fp16/bf16 1024 + c*q, the magic-number
// trick) and one packed fma (-> exact small integer q), ~1.1 warp-instructions per 16 weights at 2 bits.
//
// Work split. A CTA owns 32 columns (output features) and all of K; its warps split K into "steps" of 4
// packed word rows (64 k at 2/3 bits, 32 at 4 bits). Lane (g, t) = (lane / 4, lane % 4) loads the 16-byte
// word vector of columns col0..col0+3 (col0 = 4g) in word row 4 * step + t: 8 lanes read a 128-byte row
// segment, one load per lane per step. In the mma, W is operand A (16 rows = output features, 16 k) and x
// operand B (16 k x 8 rows of x): tile j in {0, 1} maps A row g to column col0 + 2j and row g + 8 to
// col0 + 2j + 1. The k order inside an mma is free (the dot product does not care), so each lane feeds the
// k-slots the fragment layout gives it (2t, 2t+1, 2t+8, 2t+9) with codes of its own word row t, and x is
// permuted to match: a step is kSub mmas per tile, each consuming two code pairs (p, p + half) per lane.
//
// Scales and zero points stay exact: the mma sums q * x over a group (q exact in fp16 / bf16, products exact
// in fp32), a second mma with A = ones sums x, and per group y += s * (sum q x - z * sum x) in fp32, as
// saliq/ref.py computes (q - z) * s. 2/3-bit groups of 32 span half a step: the step is then issued twice
// with x masked to the lanes of each group (NG = 2).
//
// Subnormal codes (SUB: fp16 x, M = 1, 2- and 4-bit; chosen by saliq_cuda_decode_mma_set_codes until measured):
// a code pair masked in place, with no magic exponent, is the fp16 pair c q 2^-24 (c = 2^pos), a subnormal that
// the tensor cores multiply exactly if they take subnormal operands (benchmarks/probes/mma_subnormals.cu): the
// packed fma per pair goes. The pairs of one mma share a position (pairs i and i + kSub, the word shifted by 0 and
// by 8 bits), each position sums into an accumulator of its own, and the group's epilogue scales each by 2^24 / c:
// four more instructions per output and group against 32 fewer packed fmas a step (2-bit), so only at M = 1,
// where a lane holds 4 outputs.
//
// The warps' fp32 partial sums meet in shared memory and are added in warp order: no atomics, no
// workspace, one launch whose only output is y, so it is deterministic and capturable in a CUDA graph. What
// QuantLinear adds to the product (its reserved weights x Sp^T, its LoRA term) joins in that epilogue, before
// y's one rounding, when the caller passes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/warp_reduce.cuh"

namespace saliq_decode {

constexpr int kColumns = 32;  // columns per CTA: 8 lane groups x 4 columns
constexpr int kMaxWarps = 16;
constexpr int kMaxM = 16;
constexpr int kVecWeights = 1;  // flags: N % 4 == 0 and 16-byte aligned qweight / qweight_hi, 8-byte scales, zeros
constexpr int kVecX = 2;        // rows of x 16-byte aligned (ldx % 8 == 0, aligned base)

// ------------------------------------------------------------------ compile-time fp16 / bf16 bit patterns
// Bits of a value exactly representable as a normal fp16 / bf16 (or zero); kInexact otherwise, which the
// static_asserts below reject, so a wrong constant cannot compile.
constexpr uint32_t kInexact = 0xFFFFFFFFu;
constexpr uint32_t float_bits(double v, int mant_bits, int bias) {
  const uint32_t sign = v < 0 ? (1u << (mant_bits + (bias == 15 ? 5 : 8))) : 0u;
  double a = v < 0 ? -v : v;
  if (a == 0.0) return sign;
  int e = 0;
  while (a >= 2.0) { a /= 2.0; ++e; }
  while (a < 1.0) { a *= 2.0; --e; }
  const double m = (a - 1.0) * double(1u << mant_bits);
  const uint32_t mi = (uint32_t)m;
  if ((double)mi != m || e + bias <= 0 || e + bias >= (bias == 15 ? 31 : 255)) return kInexact;
  return sign | ((uint32_t)(e + bias) << mant_bits) | mi;
}
constexpr uint32_t pair_of(uint32_t b) { return b == kInexact ? kInexact : (b | (b << 16)); }

template <typename T> struct Dt;
template <> struct Dt<__half> {
  static constexpr int kMant = 10;                 // mantissa bits: codes must sit in bits [0, 10) of a half
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr double kBase = 1024.0;
  static constexpr uint32_t kOnes = 0x3C003C00u;   // half2(1, 1)
  static constexpr uint32_t pair(double v) { return pair_of(float_bits(v, 10, 15)); }
};
template <> struct Dt<__nv_bfloat16> {
  static constexpr int kMant = 7;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128)
  static constexpr double kBase = 128.0;
  static constexpr uint32_t kOnes = 0x3F803F80u;
  static constexpr uint32_t pair(double v) { return pair_of(float_bits(v, 7, 127)); }
};

// ------------------------------------------------------------------ instructions
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {  // (a & b) | c
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

template <typename T> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <> __device__ __forceinline__ uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <> __device__ __forceinline__ uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// d += A B for a 16x16 A (row) and 16x8 B (column) tile, fp32 accumulators.
template <typename T> __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                          uint32_t a3, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                               uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Packed weights are read once: keep them out of L1 so x stays there.
__device__ __forceinline__ uint4 load_stream(const uint32_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ------------------------------------------------------------------ code pairs -> exact fp16 / bf16 integers
// Pair p of a word holds codes (p, p + per-half) of one column: the low 16 bits carry code p, the high 16 bits
// code p + 8 (2-bit, and the low plane of 3-bit) or p + 4 (4-bit). A code of width W at bit position POS of each
// half is or-ed into the mantissa of 1024 (fp16) / 128 (bf16): 1024 + c q with c = 2^POS, exact while the field
// stays inside the mantissa; one fma gives q = (1024 + c q) / c - 1024 / c exactly. As many codes as fit the
// mantissa share one shift of the word.
template <int W, int MANT, int P> struct CodeSlot {
  static constexpr int per = MANT / W;              // codes per shift
  static constexpr int shift = (P / per) * per * W;
  static constexpr int pos = (P % per) * W;
  static constexpr uint32_t mask = (((1u << W) - 1u) << pos) * 0x00010001u;
};

template <typename T, int W, int P>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word) {
  using S = CodeSlot<W, Dt<T>::kMant, P>;
  constexpr double c = double(1u << S::pos);
  constexpr uint32_t kScale = Dt<T>::pair(1.0 / c), kOffset = Dt<T>::pair(-Dt<T>::kBase / c);
  static_assert(kScale != kInexact && kOffset != kInexact, "constant not exact in this dtype");
  return fma2<T>(lop3_and_or(word >> S::shift, S::mask, Dt<T>::kMagic), kScale, kOffset);
}

// 3-bit: q = lo + 4 hi, the low two bits from the 2-bit plane word, the third from `hs` (the lane's 16 bits of
// the 1-bit plane spread so that code p sits at bit p and code p + 8 at bit 16 + p). Two fmas, both exact:
// u = 4 hi - base / c_lo, then q = (base + c_lo lo) / c_lo + u.
template <typename T, int P>
__device__ __forceinline__ uint32_t decode_pair3(uint32_t word, uint32_t hs) {
  using L = CodeSlot<2, Dt<T>::kMant, P>;
  using H = CodeSlot<1, Dt<T>::kMant, P>;
  constexpr double c_lo = double(1u << L::pos), c_hi = double(1u << H::pos), base = Dt<T>::kBase;
  constexpr uint32_t kHiScale = Dt<T>::pair(4.0 / c_hi), kHiOffset = Dt<T>::pair(-(4.0 * base / c_hi + base / c_lo));
  constexpr uint32_t kLoScale = Dt<T>::pair(1.0 / c_lo);
  static_assert(kHiScale != kInexact && kHiOffset != kInexact && kLoScale != kInexact,
                "constant not exact in this dtype");
  const uint32_t u = fma2<T>(lop3_and_or(hs >> H::shift, H::mask, Dt<T>::kMagic), kHiScale, kHiOffset);
  return fma2<T>(lop3_and_or(word >> L::shift, L::mask, Dt<T>::kMagic), kLoScale, u);
}

template <typename T, int BITS, int P = 0>
__device__ __forceinline__ void decode_word(uint32_t word, uint32_t hs, uint32_t* out) {
  constexpr int kPairs = BITS == 4 ? 4 : 8;
  if constexpr (P < kPairs) {
    if constexpr (BITS == 3) {
      out[P] = decode_pair3<T, P>(word, hs);
    } else {
      out[P] = decode_pair<T, BITS, P>(word);
    }
    decode_word<T, BITS, P + 1>(word, hs, out);
  }
}

// SUB: pair P masked in place, shifted by 8 bits from pair kSub on, so that pairs P and P + kSub share position
// (P % kSub) W; the value is the fp16 subnormal pair c q 2^-24 (2-bit: c <= 64, 4-bit: c <= 16, inside the
// mantissa).
template <int W, int P, int KSUB> struct SubSlot {
  static constexpr int shift = P < KSUB ? 0 : 8;
  static constexpr int pos = (P % KSUB) * W;
  static constexpr uint32_t mask = (((1u << W) - 1u) << pos) * 0x00010001u;
  static_assert(pos + W <= 10, "a code must stay inside the fp16 mantissa");
};

template <int BITS, int P = 0>
__device__ __forceinline__ void decode_word_sub(uint32_t word, uint32_t* out) {
  constexpr int kPairs = BITS == 4 ? 4 : 8;
  static_assert(BITS != 3, "3-bit codes take the magic-number decode");
  if constexpr (P < kPairs) {
    using S = SubSlot<BITS, P, kPairs / 2>;
    out[P] = (word >> S::shift) & S::mask;
    decode_word_sub<BITS, P + 1>(word, out);
  }
}

// ------------------------------------------------------------------ loads
__device__ __forceinline__ uint4 load_words(const uint32_t* __restrict__ base, int64_t row, int64_t rows, int64_t N,
                                            int64_t col0, bool vec) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row >= rows) return v;
  const uint32_t* p = base + row * N + col0;
  if (vec) return load_stream(p);
  if (col0 < N) v.x = __ldg(p);
  if (col0 + 1 < N) v.y = __ldg(p + 1);
  if (col0 + 2 < N) v.z = __ldg(p + 2);
  if (col0 + 3 < N) v.w = __ldg(p + 3);
  return v;
}

// Scales (4 x 16-bit) and zero points (4 x int16) of this lane's 4 columns in group `grp`, raw; zeros past the
// last group or column so that padded steps add nothing.
__device__ __forceinline__ void load_scales(const uint16_t* __restrict__ scales, const int16_t* __restrict__ zeros,
                                            int64_t grp, int64_t groups, int64_t N, int64_t col0, bool vec,
                                            uint2& s, uint2& z) {
  s = make_uint2(0u, 0u);
  z = make_uint2(0u, 0u);
  if (grp >= groups) return;
  const int64_t at = grp * N + col0;
  if (vec) {
    s = __ldg(reinterpret_cast<const uint2*>(scales + at));
    z = __ldg(reinterpret_cast<const uint2*>(zeros + at));
    return;
  }
  uint32_t sv[4] = {0u, 0u, 0u, 0u}, zv[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (col0 + c < N) {
      sv[c] = __ldg(scales + at + c);
      zv[c] = (uint16_t)__ldg(zeros + at + c);
    }
  }
  s = make_uint2(sv[0] | (sv[1] << 16), sv[2] | (sv[3] << 16));
  z = make_uint2(zv[0] | (zv[1] << 16), zv[2] | (zv[3] << 16));
}

// x[m, k0 .. k0 + 2 * NREG) as NREG registers of two 16-bit values (natural order), zero past K or M.
template <int NREG>
__device__ __forceinline__ void load_x(uint32_t (&X)[NREG], const uint16_t* __restrict__ x, int m, int M,
                                       int64_t ldx, int64_t k0, int64_t K, bool vec) {
#pragma unroll
  for (int i = 0; i < NREG; ++i) X[i] = 0u;
  if (m >= M) return;
  const uint16_t* p = x + (int64_t)m * ldx + k0;
  if (vec && k0 + 2 * NREG <= K) {
#pragma unroll
    for (int i = 0; i < NREG; i += 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + 2 * i));
      X[i] = v.x; X[i + 1] = v.y; X[i + 2] = v.z; X[i + 3] = v.w;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < NREG; ++i) {
    const uint32_t lo = k0 + 2 * i < K ? (uint32_t)__ldg(p + 2 * i) : 0u;
    const uint32_t hi = k0 + 2 * i + 1 < K ? (uint32_t)__ldg(p + 2 * i + 1) : 0u;
    X[i] = lo | (hi << 16);
  }
}

template <typename T> __device__ __forceinline__ float to_f32(uint32_t bits16);
template <> __device__ __forceinline__ float to_f32<__half>(uint32_t b) {
  return __half2float(__ushort_as_half((unsigned short)b));
}
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(uint32_t b) { return __uint_as_float(b << 16); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ------------------------------------------------------------------ the kernel
// T: __half or __nv_bfloat16 (x, scales, bias, y). BITS: 2, 3, 4. MT: rows of x served, 0: M = 1 (one 8-row
// tile, even rows only), 1: M <= 8, 2: M <= 16 (two tiles). NG: groups per step (2 for 2/3-bit groups of 32,
// else 1). FAST: every lane's columns, rows and steps are whole and every load is aligned (N % 32 == 0,
// K % step == 0, kVecWeights and kVecX, 32-bit element offsets), so the loads need no bounds checks.
template <int MT> constexpr int tiles_of() { return MT == 2 ? 2 : 1; }
// Steps whose loads a warp issues together: fewer with two 8-row tiles of x, which need twice the registers.
template <int MT> constexpr int unroll_for() { return MT == 2 ? 2 : 4; }

template <typename T, int BITS, int MT, int NG, bool FAST, bool SUB>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    decode_mma_kernel(const uint16_t* __restrict__ x, int M, int64_t ldx, int64_t K, int64_t N, int group_shift,
                      int64_t groups, const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qweight_hi,
                      const uint16_t* __restrict__ scales, const int16_t* __restrict__ zeros,
                      const T* __restrict__ bias, const int32_t* __restrict__ sp_rowptr,
                      const int32_t* __restrict__ sp_cols, const float* __restrict__ sp_vals,
                      const uint16_t* __restrict__ lora_t, const uint16_t* __restrict__ lora_B, int lora_r,
                      float lora_scale, T* __restrict__ y, int flags) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;  // codes per 32-bit word
  constexpr int kPairs = kPerWord / 2;           // code pairs per word
  constexpr int kSub = kPairs / 2;               // mmas per tile and step
  constexpr int kTiles = tiles_of<MT>();
  constexpr int U = unroll_for<MT>();
  constexpr uint32_t kOnes = Dt<T>::kOnes;
  static_assert(NG == 1 || BITS != 4, "4-bit steps never span two groups");
  static_assert(!SUB || (MT == 0 && BITS != 3 && sizeof(T) == 2 && Dt<T>::kMant == 10), "SUB: fp16, M = 1, 2/4-bit");
  constexpr int kClasses = SUB ? kSub : 1;  // accumulators per tile: one per code position (SUB)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t col0 = (int64_t)blockIdx.x * kColumns + 4 * g;
  const int64_t rows = (K + kPerWord - 1) / kPerWord;
  const int steps = (int)((rows + 3) / 4);
  const bool vec = FAST || ((flags & kVecWeights) && col0 + 4 <= N);
  const bool xvec = FAST || (flags & kVecX) != 0;
  const uint32_t spread_sel = (t & 1) ? 0x4342u : 0x4140u;  // 3-bit: this lane's 16 bits of the 1-bit plane
  const uint32_t n32 = (uint32_t)N, c32 = (uint32_t)col0;

  float acc[kTiles][2][4];
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.0f;

  for (int s0 = warp * U; s0 < steps; s0 += nwarps * U) {
    // issue every load of U steps first: the packed words are the DRAM stream
    uint4 wv[U], hv[U];
    uint2 sraw[U][NG], zraw[U][NG];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int step = s0 + u;
      const int64_t r = 4 * (int64_t)step + t;
      if constexpr (FAST) {
        // 32-bit element offsets (the launcher checked that they fit): fewer address instructions per load.
        // Past the last step the last step is loaded again (and not used): no predicate per load.
        const uint32_t st = (uint32_t)min(step, steps - 1);
        const uint32_t row = 4u * st + (uint32_t)t;
        wv[u] = load_stream(qweight + (row * n32 + c32));
        if (BITS == 3) hv[u] = load_stream(qweight_hi + ((row >> 1) * n32 + c32));
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          const uint32_t at = (NG == 2 ? 2u * st + gi : (st >> group_shift)) * n32 + c32;
          sraw[u][gi] = __ldg(reinterpret_cast<const uint2*>(scales + at));
          zraw[u][gi] = __ldg(reinterpret_cast<const uint2*>(zeros + at));
        }
      } else {
        wv[u] = load_words(qweight, r, rows, N, col0, vec);
        if (BITS == 3) hv[u] = load_words(qweight_hi, r < rows ? (r >> 1) : rows, rows, N, col0, vec);
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          const int64_t grp = step >= steps ? groups : NG == 2 ? 2 * step + gi : (step >> group_shift);
          load_scales(scales, zeros, grp, groups, N, col0, vec, sraw[u][gi], zraw[u][gi]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int step = s0 + u;
      if (step >= steps) break;  // warp-uniform
      const int64_t r = 4 * (int64_t)step + t;

      // x fragments: pair p = (x[k0 + p], x[k0 + p + kPairs]) of row m = 8 mt + g, the codes' pairing
      uint32_t xp[kTiles][kPairs];
#pragma unroll
      for (int mt = 0; mt < kTiles; ++mt) {
        uint32_t X[kPairs];
        if constexpr (FAST) {
          // rows of x past M read row M - 1 instead of zeros: the products of an mma column reach only that
          // column's output row, and rows >= M are never written (no predicate, no zeroing per step)
          const uint32_t m = (uint32_t)min(8 * mt + g, M - 1);
          const uint16_t* p = x + (m * (uint32_t)ldx + (uint32_t)r * kPerWord);
#pragma unroll
          for (int i = 0; i < kPairs; i += 4) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + 2 * i));
            X[i] = v.x; X[i + 1] = v.y; X[i + 2] = v.z; X[i + 3] = v.w;
          }
        } else {
          load_x<kPairs>(X, x, 8 * mt + g, M, ldx, r * kPerWord, K, xvec);
        }
#pragma unroll
        for (int p = 0; p < kPairs; ++p)
          xp[mt][p] = prmt(X[p >> 1], X[(p >> 1) + kPairs / 2], (p & 1) ? 0x7632u : 0x5410u);
      }

      // weights: 4 columns x kPairs exact code pairs
      const uint32_t w[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      uint32_t wp[4][kPairs];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t hs = 0u;
        if (BITS == 3) {
          const uint32_t h = c == 0 ? hv[u].x : c == 1 ? hv[u].y : c == 2 ? hv[u].z : hv[u].w;
          hs = prmt(h, 0u, spread_sel);
        }
        if constexpr (SUB) decode_word_sub<BITS>(w[c], wp[c]);
        else decode_word<T, BITS>(w[c], hs, wp[c]);
      }

#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        // NG == 2: lanes t = 0, 1 hold the first group's word rows, t = 2, 3 the second's
        const uint32_t keep = (NG == 1 || (t >> 1) == gi) ? 0xFFFFFFFFu : 0u;
        float d[kTiles][2][kClasses][4], dx[kTiles][4];
#pragma unroll
        for (int mt = 0; mt < kTiles; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dx[mt][e] = 0.0f;
#pragma unroll
            for (int cl = 0; cl < kClasses; ++cl) {
              d[mt][0][cl][e] = 0.0f;
              d[mt][1][cl][e] = 0.0f;
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kSub; ++i) {
          // the two code pairs of this mma (SUB: pairs of one position, which owns accumulator i)
          const int pa = SUB ? i : 2 * i, pb = SUB ? i + kSub : 2 * i + 1, cl = SUB ? i : 0;
#pragma unroll
          for (int mt = 0; mt < kTiles; ++mt) {
            const uint32_t b0 = xp[mt][pa] & keep, b1 = xp[mt][pb] & keep;
            mma<T>(dx[mt], kOnes, kOnes, kOnes, kOnes, b0, b1);  // sum of x over the same k
#pragma unroll
            for (int j = 0; j < 2; ++j)
              mma<T>(d[mt][j][cl], wp[2 * j][pa], wp[2 * j + 1][pa], wp[2 * j][pb], wp[2 * j + 1][pb], b0, b1);
          }
        }
        // y += s (sum q x - z sum x), per column; element e of tile j is column 2j + e / 2, row 2t + e % 2
        const uint2 sr = sraw[u][gi], zr = zraw[u][gi];
        const float s[4] = {to_f32<T>(sr.x & 0xFFFFu), to_f32<T>(sr.x >> 16), to_f32<T>(sr.y & 0xFFFFu),
                            to_f32<T>(sr.y >> 16)};
        const float z[4] = {(float)(int16_t)(zr.x & 0xFFFFu), (float)(int16_t)(zr.x >> 16),
                            (float)(int16_t)(zr.y & 0xFFFFu), (float)(int16_t)(zr.y >> 16)};
#pragma unroll
        for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (MT == 0 && (e & 1)) continue;  // M = 1: odd rows of x are padding
              const int c = 2 * j + (e >> 1);
              if constexpr (SUB) {  // sum q x = 2^24 sum_i d_i / c_i, c_i = 2^(BITS i)
                float v = -z[c] * dx[mt][e & 1];
#pragma unroll
                for (int cl = 0; cl < kClasses; ++cl)
                  v = fmaf(d[mt][j][cl][e], __int_as_float((127 + 24 - BITS * cl) << 23), v);
                acc[mt][j][e] = fmaf(s[c], v, acc[mt][j][e]);
              } else {
                acc[mt][j][e] = fmaf(s[c], fmaf(-z[c], dx[mt][e & 1], d[mt][j][0][e]), acc[mt][j][e]);
              }
            }
      }
    }
  }

  // the warps' partial sums, added in warp order
  __shared__ float red[kMaxWarps][kMaxM][kColumns];
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * mt + 2 * t + (e & 1);
        if (m < M) red[warp][m][4 * g + 2 * j + (e >> 1)] = acc[mt][j][e];
      }
  __syncthreads();
  const bool reserved = sp_rowptr != nullptr, lora = lora_t != nullptr;  // uniform
  const bool extras = reserved || lora;
  for (int idx = threadIdx.x; idx < M * kColumns; idx += blockDim.x) {
    const int m = idx / kColumns, col = idx % kColumns;
    const int64_t n = (int64_t)blockIdx.x * kColumns + col;
    if (n >= N) continue;
    float sum = 0.0f;
    for (int w = 0; w < nwarps; ++w) sum += red[w][m][col];
    if (bias != nullptr) sum += to_f32<T>(reinterpret_cast<const uint16_t*>(bias)[n]);
    if (extras)
      red[0][m][col] = sum;  // only this thread reads or writes element (m, col)
    else
      y[(int64_t)m * N + n] = from_f32<T>(sum);
  }
  if (!extras) return;
  // What QuantLinear adds to the packed product, in the same launch and before the one rounding of y, a warp per
  // output, its lanes' terms summed by a fixed shuffle tree (deterministic):
  // - the reserved weights (CSR by output feature, fp32 values): lanes over the row's nonzeros; columns outside
  //   [0, K) are skipped, as the sparse_addmm kernel does;
  // - the LoRA term lora_scale * t B^T, t = x A^T [M, r] computed by the caller: lanes over r.
  __syncthreads();
  for (int o = warp; o < M * kColumns; o += nwarps) {
    const int m = o / kColumns, col = o % kColumns;
    const int64_t n = (int64_t)blockIdx.x * kColumns + col;
    if (n >= N) continue;  // warp-uniform
    float part = 0.0f;
    if (reserved) {
      const uint16_t* xr = x + (int64_t)m * ldx;
      for (int j = sp_rowptr[n] + lane; j < sp_rowptr[n + 1]; j += 32) {
        const int c = __ldg(sp_cols + j);
        if ((unsigned)c < (unsigned)K) part = fmaf(__ldg(sp_vals + j), to_f32<T>(__ldg(xr + c)), part);
      }
    }
    if (lora) {
      float dot = 0.0f;
      for (int r = lane; r < lora_r; r += 32)
        dot = fmaf(to_f32<T>(__ldg(lora_t + (int64_t)m * lora_r + r)), to_f32<T>(__ldg(lora_B + n * lora_r + r)), dot);
      part = fmaf(lora_scale, dot, part);
    }
    part = saliq_cuda::warp_sum(part);
    if (lane == 0) y[(int64_t)m * N + n] = from_f32<T>(red[0][m][col] + part);
  }
}

struct Launch {
  const void* x;
  int M;
  int64_t ldx, K, N;
  int group_shift;  // group of step s: s >> group_shift (steps per group a power of two; 31 for one group)
  int64_t groups;
  const int32_t *qweight, *qweight_hi;
  const void *scales, *bias;
  const int16_t* zeros;
  const int32_t *sp_rowptr, *sp_cols;  // reserved weights (CSR by output feature), or null
  const float* sp_vals;
  const void *lora_t, *lora_B;  // t = x A^T [M, r] and B [N, r] in x's dtype, or null
  int lora_r;
  float lora_scale;
  void* y;
  int flags, warps, sms;
  bool fast;
  bool subnormal;  // SUB codes where the instance exists (fp16, M = 1, 2/4-bit); saliq_cuda_decode_mma_set_codes
  cudaStream_t stream;
  int* query_warps;  // non-null: store the warps per CTA this call would use, launch nothing
};

// Warps per CTA. Measured on an H200 (benchmarks/results/2026-11-26-nvidia-h200-decode-warps.md): the best
// count puts about 16 warps on every SM in a single wave of CTAs, e.g. 16 for 128 CTAs (N = 4096), 8 for 256,
// 6 for 344 at 2 bits but 4 at 3 bits, whose larger register count fits fewer CTAs per SM. So: the largest
// count whose warps stay within 16 per SM and whose CTAs all fit at once given the kernel's registers; with
// more CTAs than that, 4.
inline int choose_warps(int64_t ctas, int regs, int sms, int64_t useful) {
  const int per_warp = (regs * 32 + 255) / 256 * 256;  // registers are allocated per warp in units of 256
  const int warps_per_sm = per_warp > 0 ? 65536 / per_warp : 16;
  int chosen = 4;
  for (int w : {16, 12, 8, 6, 4}) {
    if (ctas * w <= 16 * (int64_t)sms && ctas <= (int64_t)sms * (warps_per_sm / w)) {
      chosen = w;
      break;
    }
  }
  if (chosen > useful) chosen = (int)(useful < 1 ? 1 : useful);
  return chosen;
}

template <typename T, int BITS, int MT, int NG, bool FAST, bool SUB = false>
int launch_typed(const Launch& a) {
  const auto kernel = decode_mma_kernel<T, BITS, MT, NG, FAST, SUB>;
  const int64_t ctas = (a.N + kColumns - 1) / kColumns;
  int warps = a.warps;
  if (warps <= 0) {
    static int regs = 0;  // per instance; a race only writes the same value twice
    if (regs == 0) {
      cudaFuncAttributes attr;
      regs = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.numRegs : 128;
      cudaGetLastError();
    }
    const int64_t per_word = BITS == 4 ? 8 : 16;
    const int64_t steps = ((a.K + per_word - 1) / per_word + 3) / 4;
    warps = choose_warps(ctas, regs, a.sms, (steps + unroll_for<MT>() - 1) / unroll_for<MT>());
  }
  if (warps > kMaxWarps) warps = kMaxWarps;
  if (a.query_warps != nullptr) {
    *a.query_warps = warps;
    return 0;
  }
  kernel<<<dim3((unsigned)ctas), warps * 32, 0, a.stream>>>(
      static_cast<const uint16_t*>(a.x), a.M, a.ldx, a.K, a.N, a.group_shift, a.groups,
      reinterpret_cast<const uint32_t*>(a.qweight), reinterpret_cast<const uint32_t*>(a.qweight_hi),
      static_cast<const uint16_t*>(a.scales), a.zeros, static_cast<const T*>(a.bias), a.sp_rowptr, a.sp_cols,
      a.sp_vals, static_cast<const uint16_t*>(a.lora_t), static_cast<const uint16_t*>(a.lora_B), a.lora_r,
      a.lora_scale, static_cast<T*>(a.y), a.flags);
  return (int)cudaGetLastError();
}

template <typename T, int BITS, int NG, bool FAST>
int launch_rows(const Launch& a) {
  if constexpr (BITS != 3 && Dt<T>::kMant == 10) {
    if (a.M == 1 && a.subnormal) return launch_typed<T, BITS, 0, NG, FAST, true>(a);
  }
  if (a.M == 1) return launch_typed<T, BITS, 0, NG, FAST>(a);
  return a.M > 8 ? launch_typed<T, BITS, 2, NG, FAST>(a) : launch_typed<T, BITS, 1, NG, FAST>(a);
}

template <typename T, int BITS, int NG>
int launch_fast(const Launch& a) {
  return a.fast ? launch_rows<T, BITS, NG, true>(a) : launch_rows<T, BITS, NG, false>(a);
}

template <typename T, int BITS>
int launch_dtype(const Launch& a) {
  // a step spans 64 k at 2/3 bits: only groups of 32 split it (per-channel groups never do)
  if constexpr (BITS == 4) {
    return launch_fast<T, BITS, 1>(a);
  } else {
    const bool two_groups = a.groups > 1 && a.K / a.groups == 32;
    return two_groups ? launch_fast<T, BITS, 2>(a) : launch_fast<T, BITS, 1>(a);
  }
}

template <int BITS>
int launch_bits(const Launch& a, bool bf16) {
  return bf16 ? launch_dtype<__nv_bfloat16, BITS>(a) : launch_dtype<__half, BITS>(a);
}

int launch_b2(const Launch& a, bool bf16);
int launch_b3(const Launch& a, bool bf16);
int launch_b4(const Launch& a, bool bf16);

}  // namespace saliq_decode
