// W[N, K] = (q - z) * s from packed format v1 (saliq/ref.py dequantize): the first half of a prefill that hands
// the dequantized weight to cuBLAS.
//
// Work split: one thread per (column n, word row r of the low plane): it loads its word (and, at 3 bits, the
// 1-bit plane's word) once, coalesced along N across the warp, and writes the word's 16 (8 at 4 bits)
// consecutive elements of row n of W: 32 bytes in fp16 / bf16, whole sectors, with 16-byte stores when the row
// and the word are aligned. The weight is read once and W written once, so the kernel is bound by the write of
// W. Arithmetic: quant_math.h's dequant_value in fp32, then one rounding to the output dtype, as the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/quant_math.h"
#include "cuda/convert.cuh"
#include "cuda/launchers.h"

namespace {

constexpr int kThreads = 256;

using saliq_cuda::from_f32;
using saliq_cuda::to_f32;

// S: scale dtype, O: output dtype. WHOLE: every word row is whole (K % codes per word == 0), the word lies in
// one group (group_len % codes per word == 0) and rows of W are 16-byte aligned: 16-byte stores, no checks.
template <typename S, typename O, int BITS, bool WHOLE>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qweight_hi,
                      const S* __restrict__ scales, const int16_t* __restrict__ zeros, int64_t K, int64_t N,
                      int64_t group_len, O* __restrict__ out) {
  constexpr int kWidth = BITS == 4 ? 4 : 2;
  constexpr int kPer = 32 / kWidth;  // codes per word of the low plane
  const int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (n >= N) return;
  const int64_t k0 = r * kPer;
  const uint32_t word = __ldg(qweight + r * N + n);
  uint32_t hword = 0u;
  int hshift = 0;
  if (BITS == 3) {
    hword = __ldg(qweight_hi + (r >> 1) * N + n);
    hshift = (int)(r & 1) * 16;  // this word row's 16 codes in the 1-bit plane's 32
  }
  alignas(16) O vals[kPer];  // whole-word path: stored as 16-byte vectors
  if (WHOLE) {
    // 32-bit division (K < 2^31): a 64-bit one costs as much as the thread's other work
    const int64_t at = (int64_t)((uint32_t)k0 / (uint32_t)group_len) * N + n;
    const float s = to_f32(__ldg(scales + at)), z = (float)__ldg(zeros + at);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      uint32_t q = saliq::extract_code(word, j, kWidth);
      if (BITS == 3) q |= saliq::extract_code(hword, hshift + j, 1) << 2;
      vals[j] = from_f32<O>(saliq::dequant_value(q, z, s));
    }
    // kPer elements of O: 32 bytes (fp16 / bf16, 2-bit), 64 (fp32, 2-bit), 16 / 32 (4-bit)
    uint4* dst = reinterpret_cast<uint4*>(out + n * K + k0);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
    for (int i = 0; i < (int)(kPer * sizeof(O) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t k = k0 + j;
      if (k >= K) break;
      const int64_t at = (int64_t)((uint32_t)k / (uint32_t)group_len) * N + n;
      uint32_t q = saliq::extract_code(word, j, kWidth);
      if (BITS == 3) q |= saliq::extract_code(hword, hshift + j, 1) << 2;
      const float s = to_f32(__ldg(scales + at)), z = (float)__ldg(zeros + at);
      out[n * K + k] = from_f32<O>(saliq::dequant_value(q, z, s));
    }
  }
}

template <typename S, typename O, int BITS>
int launch(const void* qweight, const void* qweight_hi, const void* scales, const int16_t* zeros, int64_t K,
           int64_t N, int64_t group_len, void* out, cudaStream_t stream) {
  constexpr int kPer = BITS == 4 ? 8 : 16;
  const int64_t rows = (K + kPer - 1) / kPer;
  if (rows == 0 || N == 0) return 0;
  if (rows > 65535) return (int)cudaErrorInvalidConfiguration;  // grid.y; K above 1 M elements
  const dim3 grid((unsigned)((N + kThreads - 1) / kThreads), (unsigned)rows);
  const bool whole = K % kPer == 0 && group_len % kPer == 0 && (K * (int64_t)sizeof(O)) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const auto* qw = static_cast<const uint32_t*>(qweight);
  const auto* qh = static_cast<const uint32_t*>(qweight_hi);
  const auto* sc = static_cast<const S*>(scales);
  auto* o = static_cast<O*>(out);
  if (whole)
    dequantize_kernel<S, O, BITS, true><<<grid, kThreads, 0, stream>>>(qw, qh, sc, zeros, K, N, group_len, o);
  else
    dequantize_kernel<S, O, BITS, false><<<grid, kThreads, 0, stream>>>(qw, qh, sc, zeros, K, N, group_len, o);
  return (int)cudaGetLastError();
}

template <typename S, typename O>
int launch_bits(int bits, const void* qw, const void* qh, const void* sc, const int16_t* z, int64_t K, int64_t N,
                int64_t g, void* out, cudaStream_t st) {
  switch (bits) {
    case 2: return launch<S, O, 2>(qw, qh, sc, z, K, N, g, out, st);
    case 3: return launch<S, O, 3>(qw, qh, sc, z, K, N, g, out, st);
    case 4: return launch<S, O, 4>(qw, qh, sc, z, K, N, g, out, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

template <typename S>
int launch_out(int out_dtype, int bits, const void* qw, const void* qh, const void* sc, const int16_t* z, int64_t K,
               int64_t N, int64_t g, void* out, cudaStream_t st) {
  switch (out_dtype) {
    case SALIQ_F32: return launch_bits<S, float>(bits, qw, qh, sc, z, K, N, g, out, st);
    case SALIQ_F16: return launch_bits<S, __half>(bits, qw, qh, sc, z, K, N, g, out, st);
    case SALIQ_BF16: return launch_bits<S, __nv_bfloat16>(bits, qw, qh, sc, z, K, N, g, out, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int saliq_cuda_dequantize(int bits, int64_t K, int64_t N, int64_t group_len, const int32_t* qweight,
                                     const int32_t* qweight_hi, const void* scales, int scale_dtype,
                                     const int16_t* zeros, void* out, int out_dtype, intptr_t stream) {
  if (group_len <= 0 || K >= (int64_t(1) << 31)) return (int)cudaErrorInvalidValue;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t g = group_len;
  switch (scale_dtype) {
    case SALIQ_F32: return launch_out<float>(out_dtype, bits, qweight, qweight_hi, scales, zeros, K, N, g, out, st);
    case SALIQ_F16: return launch_out<__half>(out_dtype, bits, qweight, qweight_hi, scales, zeros, K, N, g, out, st);
    case SALIQ_BF16:
      return launch_out<__nv_bfloat16>(out_dtype, bits, qweight, qweight_hi, scales, zeros, K, N, g, out, st);
    default: return (int)cudaErrorInvalidValue;
  }
}
