// Decode GEMV y = x W^T + bias for M = 1..8 rows of x, W in packed format v1 (K-major words, N contiguous).
// Work split: a 128-thread block owns 32 columns; each thread owns 4 adjacent columns (one 16-byte load of
// 4 packed words per word row, coalesced: 8 lanes read a 128-byte row segment) and one of 16 K-slices
// (word rows slice, slice + 16, ...). Codes become half2 with the magic-number trick (lop3 of the shifted
// word with 0x64006400 = half2(1024, 1024), minus 1024), then fp32: per word row and column
// acc += s * (sum_j q_j x_j - z * sum_j x_j), fp32 throughout. The 16 K-slices are reduced with warp
// shuffles and then across warps in a fixed order. When N is small, blockIdx.y splits K; the partial sums
// go to a workspace that a second kernel adds up in split order (deterministic, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/quant_math.h"
#include "cuda/launchers.h"

namespace {

constexpr int kThreads = 128;
constexpr int kColumnsPerBlock = 32;
constexpr int kSlices = 16;  // K-slices per block: 4 per warp x 4 warps
constexpr int kMaxM = 8;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {  // (a & b) | c
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Two codes already placed at bits 0.. and 16.. of `bits` -> float2 exactly, through half2(1024 + q).
__device__ __forceinline__ float2 codes_to_float2(uint32_t bits, uint32_t mask, uint32_t extra) {
  const uint32_t h = lop3_and_or(bits, mask, 0x64006400u) | extra;
  const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&h), __float2half2_rn(1024.0f));
  return __half22float2(v);
}

// Codes q[0..kPerWord) of one packed word (3-bit: hi4 = the 8+8 hi bits spread to bits 2 and 18, see below).
template <int BITS>
__device__ __forceinline__ void unpack_word(uint32_t w, uint32_t hi4, float* q) {
  if (BITS == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // codes j and j + 4
      const float2 f = codes_to_float2(w >> (4 * j), 0x000F000Fu, 0u);
      q[j] = f.x;
      q[j + 4] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // codes j and j + 8
      const uint32_t extra = BITS == 3 ? ((hi4 >> j) & 0x00040004u) : 0u;
      const float2 f = codes_to_float2(w >> (2 * j), 0x00030003u, extra);
      q[j] = f.x;
      q[j + 8] = f.y;
    }
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads)
    packed_gemv_kernel(const float* __restrict__ x, int M, int64_t k_padded, int64_t N, int64_t group_len,
                       int64_t rows_total, int64_t rows_per_split, const int32_t* __restrict__ qweight,
                       const int32_t* __restrict__ qweight_hi, const T* __restrict__ scales,
                       const int16_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                       float* __restrict__ workspace) {
  constexpr int kPerWord = BITS == 4 ? 8 : 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int quad = lane & 7;
  const int slice = warp * 4 + (lane >> 3);
  const int64_t n0 = (int64_t)blockIdx.x * kColumnsPerBlock + quad * 4;
  const int64_t r_begin = (int64_t)blockIdx.y * rows_per_split;
  const int64_t r_end = min(rows_total, r_begin + rows_per_split);
  // 16-byte loads need 4-word aligned rows (N % 4 == 0) and aligned base pointers
  const bool vector_loads = (N & 3) == 0 && n0 + 4 <= N && (reinterpret_cast<uintptr_t>(qweight) & 15) == 0 &&
                            (BITS != 3 || (reinterpret_cast<uintptr_t>(qweight_hi) & 15) == 0);

  float acc[kMaxM][4];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;

  for (int64_t r = r_begin + slice; r < r_end; r += kSlices) {
    uint32_t w[4], h[4];
    if (vector_loads) {
      const int4 v = __ldg(reinterpret_cast<const int4*>(qweight + r * N + n0));
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
      if (BITS == 3) {
        const int4 u = __ldg(reinterpret_cast<const int4*>(qweight_hi + (r >> 1) * N + n0));
        h[0] = u.x; h[1] = u.y; h[2] = u.z; h[3] = u.w;
      }
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool ok = n0 + c < N;
        w[c] = ok ? (uint32_t)qweight[r * N + n0 + c] : 0u;
        if (BITS == 3) h[c] = ok ? (uint32_t)qweight_hi[(r >> 1) * N + n0 + c] : 0u;
      }
    }
    const int64_t g = r * kPerWord / group_len;
    float s[4], z[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool ok = n0 + c < N;
      s[c] = ok ? to_float<T>(scales[g * N + n0 + c]) : 0.0f;
      z[c] = ok ? (float)zeros[g * N + n0 + c] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t hi4 = 0;
      if (BITS == 3) {  // bits 16 (r & 1) + [0, 8) and + [8, 16) of the hi word -> bits 2 + j and 18 + j
        const uint32_t hh = h[c] >> (16 * (int)(r & 1));
        hi4 = ((hh & 0xFFu) | ((hh & 0xFF00u) << 8)) << 2;
      }
      float q[kPerWord];
      unpack_word<BITS>(w[c], hi4, q);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          const float* xr = x + m * k_padded + r * kPerWord;
          float dot = 0.0f, xs = 0.0f;
#pragma unroll
          for (int j = 0; j < kPerWord; j += 4) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(xr + j));
            dot = fmaf(q[j], xv.x, dot);
            dot = fmaf(q[j + 1], xv.y, dot);
            dot = fmaf(q[j + 2], xv.z, dot);
            dot = fmaf(q[j + 3], xv.w, dot);
            xs += (xv.x + xv.y) + (xv.z + xv.w);
          }
          acc[m][c] = fmaf(s[c], fmaf(-z[c], xs, dot), acc[m][c]);
        }
      }
    }
  }

  // reduce the 4 K-slices of a warp (lanes quad, quad + 8, + 16, + 24), then the 4 warps in order
  __shared__ float partial[4][kMaxM][kColumnsPerBlock];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[m][c];
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 8 && m < M) partial[warp][m][quad * 4 + c] = v;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < M * kColumnsPerBlock; t += kThreads) {
    const int m = t / kColumnsPerBlock, col = t % kColumnsPerBlock;
    const int64_t n = (int64_t)blockIdx.x * kColumnsPerBlock + col;
    if (n >= N) continue;
    const float sum = ((partial[0][m][col] + partial[1][m][col]) + partial[2][m][col]) + partial[3][m][col];
    if (gridDim.y == 1) {
      y[m * N + n] = from_float<T>(sum + (bias ? to_float<T>(bias[n]) : 0.0f));
    } else {
      workspace[((int64_t)blockIdx.y * M + m) * N + n] = sum;
    }
  }
}

template <typename T>
__global__ void split_k_reduce_kernel(const float* __restrict__ workspace, int split_k, int64_t MN, int64_t N,
                                      const T* __restrict__ bias, T* __restrict__ y) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float sum = 0.0f;
  for (int s = 0; s < split_k; ++s) sum += workspace[s * MN + i];
  y[i] = from_float<T>(sum + (bias ? to_float<T>(bias[i % N]) : 0.0f));
}

template <typename T>
int launch(const float* x, int64_t M, int64_t K, int64_t N, int64_t group_len, int bits, const int32_t* qweight,
           const int32_t* qweight_hi, const void* scales, const int16_t* zeros, const void* bias, void* y,
           float* workspace, int split_k, cudaStream_t st) {
  const int per_word = bits == 4 ? 8 : 16;
  const int64_t rows_total = (K + per_word - 1) / per_word;
  const int64_t k_padded = (K + 31) / 32 * 32;
  if (split_k < 1) split_k = 1;
  const int64_t rows_per_split = (rows_total + split_k - 1) / split_k;
  const dim3 grid((unsigned)((N + kColumnsPerBlock - 1) / kColumnsPerBlock), (unsigned)split_k);
  const T* s = static_cast<const T*>(scales);
  const T* b = static_cast<const T*>(bias);
  T* out = static_cast<T*>(y);
#define SALIQ_GEMV_ARGS                                                                                       \
  x, (int)M, k_padded, N, group_len, rows_total, rows_per_split, qweight, qweight_hi, s, zeros, b, out, workspace
  switch (bits) {
    case 2: packed_gemv_kernel<T, 2><<<grid, kThreads, 0, st>>>(SALIQ_GEMV_ARGS); break;
    case 3: packed_gemv_kernel<T, 3><<<grid, kThreads, 0, st>>>(SALIQ_GEMV_ARGS); break;
    default: packed_gemv_kernel<T, 4><<<grid, kThreads, 0, st>>>(SALIQ_GEMV_ARGS); break;
  }
#undef SALIQ_GEMV_ARGS
  if (split_k > 1) {
    const int64_t mn = M * N;
    split_k_reduce_kernel<T><<<(unsigned)((mn + 255) / 256), 256, 0, st>>>(workspace, split_k, mn, N, b, out);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int saliq_cuda_packed_gemv_split_k(int64_t M, int64_t K, int64_t N, int64_t group_len) {
  (void)M;
  (void)group_len;
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaGetLastError();
  const int64_t blocks = (N + kColumnsPerBlock - 1) / kColumnsPerBlock;
  const int64_t target = 4 * (int64_t)sms;  // enough resident blocks to keep the loads in flight
  int64_t split = (target + blocks - 1) / blocks;
  const int64_t max_split = K / (16 * kSlices);  // at least one word row per K-slice
  if (split > max_split) split = max_split;
  if (split > 16) split = 16;
  return split < 1 ? 1 : (int)split;
}

extern "C" int saliq_cuda_packed_gemv(const float* x, int dtype, int64_t M, int64_t K, int64_t N, int64_t group_len,
                                      int bits, const int32_t* qweight, const int32_t* qweight_hi, const void* scales,
                                      const int16_t* zeros, const void* bias, void* y, float* workspace, int split_k,
                                      intptr_t stream) {
  if (M < 1 || M > kMaxM) return (int)cudaErrorInvalidValue;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case SALIQ_F16:
      return launch<__half>(x, M, K, N, group_len, bits, qweight, qweight_hi, scales, zeros, bias, y, workspace,
                            split_k, st);
    case SALIQ_BF16:
      return launch<__nv_bfloat16>(x, M, K, N, group_len, bits, qweight, qweight_hi, scales, zeros, bias, y,
                                   workspace, split_k, st);
    default:
      return launch<float>(x, M, K, N, group_len, bits, qweight, qweight_hi, scales, zeros, bias, y, workspace,
                           split_k, st);
  }
}
