// extern "C" entry of the tensor-core decode kernel (decode_mma.cuh): argument checks, the warps-per-CTA
// heuristic and the dispatch to the per-bit-width instances.
#include <cuda_runtime.h>

#include "cuda/decode_mma.cuh"
#include "cuda/launchers.h"

namespace {

constexpr int kMaxDevices = 64;

// How the M = 1 fp16 kernel turns 2- and 4-bit codes into mma operands: 0 the magic-number decode (a packed fma
// per pair), 1 subnormal codes (decode_mma.cuh, SUB); saliq_cuda_decode_mma_set_codes.
int g_codes = 0;

int multiprocessors() {
  static int cached[kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return 132;
  }
  if (cached[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      cudaGetLastError();
      sms = 132;
    }
    cached[device] = sms;
  }
  return cached[device];
}

int decode_mma(const void* x, int dtype, int64_t M, int64_t ldx, int64_t K, int64_t N, int64_t group_len, int bits,
               const int32_t* qweight, const int32_t* qweight_hi, const void* scales, const int16_t* zeros,
               const void* bias, const int32_t* sp_rowptr, const int32_t* sp_cols, const float* sp_vals,
               const void* lora_t, const void* lora_B, int64_t lora_r, float lora_scale, void* y, int warps,
               intptr_t stream, int* query_warps) {
  using namespace saliq_decode;
  if (M < 1 || M > kMaxM || K < 1 || N < 1 || ldx < K || (dtype != SALIQ_F16 && dtype != SALIQ_BF16) ||
      (bits != 2 && bits != 3 && bits != 4) || group_len < 1 ||
      (group_len != K && group_len != 32 && group_len != 64 && group_len != 128) ||
      (bits == 3 && qweight_hi == nullptr && query_warps == nullptr) ||
      (sp_rowptr != nullptr && (sp_cols == nullptr || sp_vals == nullptr)) ||
      (lora_t != nullptr && (lora_B == nullptr || lora_r < 1 || lora_r > 65536)))
    return (int)cudaErrorInvalidValue;
  const auto aligned = [](const void* p, uintptr_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; };
  int flags = 0;
  if (N % 4 == 0 && aligned(qweight, 16) && (bits != 3 || aligned(qweight_hi, 16)) && aligned(scales, 8) &&
      aligned(zeros, 8))
    flags |= kVecWeights;
  if (ldx % 8 == 0 && aligned(x, 16)) flags |= kVecX;
  const int64_t step_k = 4 * (bits == 4 ? 8 : 16);
  const int64_t groups = (K + group_len - 1) / group_len;
  // group of step s = s >> shift: steps per group are 1, 2 or 4 (groups of 64 / 128), or one group in all (31)
  int shift = 31;
  if (groups > 1 && group_len >= step_k) {
    shift = 0;
    while ((step_k << shift) < group_len) ++shift;
    if ((step_k << shift) != group_len) return (int)cudaErrorInvalidValue;
  }
  const int64_t rows = K / (bits == 4 ? 8 : 16) + 1;
  const bool offsets_fit = rows * N < (int64_t(1) << 31) && groups * N < (int64_t(1) << 31) &&
                           M * ldx < (int64_t(1) << 31);
  const bool fast = flags == (kVecWeights | kVecX) && N % kColumns == 0 && K % step_k == 0 && offsets_fit;
  Launch a{x, (int)M, ldx, K, N, shift, groups, qweight, qweight_hi, scales, bias, zeros,
           sp_rowptr, sp_cols, sp_vals, lora_t, lora_B, (int)lora_r, lora_scale,
           y, flags, warps, multiprocessors(), fast, g_codes == 1, reinterpret_cast<cudaStream_t>(stream),
           query_warps};
  const bool bf16 = dtype == SALIQ_BF16;
  switch (bits) {
    case 2: return launch_b2(a, bf16);
    case 3: return launch_b3(a, bf16);
    default: return launch_b4(a, bf16);
  }
}

}  // namespace

extern "C" int saliq_cuda_decode_mma(const void* x, int dtype, int64_t M, int64_t ldx, int64_t K, int64_t N,
                                     int64_t group_len, int bits, const int32_t* qweight, const int32_t* qweight_hi,
                                     const void* scales, const int16_t* zeros, const void* bias,
                                     const int32_t* sp_rowptr, const int32_t* sp_cols, const float* sp_vals,
                                     const void* lora_t, const void* lora_B, int64_t lora_r, float lora_scale,
                                     void* y, int warps, intptr_t stream) {
  return decode_mma(x, dtype, M, ldx, K, N, group_len, bits, qweight, qweight_hi, scales, zeros, bias, sp_rowptr,
                    sp_cols, sp_vals, lora_t, lora_B, lora_r, lora_scale, y, warps, stream, nullptr);
}

extern "C" int saliq_cuda_decode_mma_warps(int dtype, int64_t M, int64_t K, int64_t N, int64_t group_len, int bits) {
  // aligned dummy pointers: the choice depends on the shape, not on the data
  const void* p = reinterpret_cast<const void*>(uintptr_t(256));
  int warps = 0;
  const int err = decode_mma(p, dtype, M, K, K, N, group_len, bits, static_cast<const int32_t*>(p),
                             static_cast<const int32_t*>(p), p, static_cast<const int16_t*>(p), nullptr, nullptr,
                             nullptr, nullptr, nullptr, nullptr, 0, 0.0f, nullptr, 0, 0, &warps);
  return err == 0 ? warps : -err;
}

extern "C" int saliq_cuda_decode_mma_set_codes(int codes) {
  if (codes != 0 && codes != 1) return -1;
  const int previous = g_codes;
  g_codes = codes;
  return previous;
}
