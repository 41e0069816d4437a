// fp16 -> fp32, one value at a time, for the loops that read fp16 operands without F16C vectors (dense_rows.cpp: the
// portable path and rows shorter than a vector; its AVX2 / AVX-512 paths widen 8 or 16 halves an instruction).
//
// Why not c10::Half's conversion: a call per element inside such loops (at::vec::half2float_scalar), which does not
// vectorise: an fp16 LoRA term took 11x a bf16 one at M = 1 (a 2-bit 4096 x 4096 layer with rank 64: 3.8x the
// whole call) and an fp16 dense GEMV 15x (docs/NOTES.md).
#pragma once

#include <stdint.h>

namespace saliq {

// c10's portable fp16 -> fp32 (fp16_ieee_to_fp32_value): exact for every half (subnormals, infinities, NaN).
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
