// fp16 -> fp32 for loops that read fp16 operands: QuantLinear's LoRA factor B (quant_linear_ops.cpp), and one value
// at a time where F16C is absent (dense_rows.cpp widens A in registers).
//
// Why: c10::Half's conversion is a call per element inside such loops (at::vec::half2float_scalar), which does not
// vectorise: an fp16 LoRA term took 11x a bf16 one at M = 1 (a 2-bit 4096 x 4096 layer with rank 64: 3.8x the
// whole call) and an fp16 dense GEMV 15x (docs/NOTES.md). Runs of values are converted here first, with F16C (16 or
// 8 values an instruction), then read as fp32.
#pragma once

#include <stdint.h>

namespace saliq {

// dst[i] = the fp16 value with bits src[i], for i in [0, n); exact for every half (subnormals, infinities, NaN).
void halves_to_floats(const uint16_t* src, float* dst, int64_t n);

// One value, without F16C: c10's portable fp16 -> fp32 (fp16_ieee_to_fp32_value).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = __builtin_bit_cast(float, (two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = __builtin_bit_cast(float, (two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? __builtin_bit_cast(uint32_t, subnormal) : __builtin_bit_cast(uint32_t, normalized);
  return __builtin_bit_cast(float, sign | magnitude);
}

}  // namespace saliq
