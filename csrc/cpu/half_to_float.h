// fp16 -> fp32 for the loops that read fp16 operands (LoRA factors, a dense fp16 layer's weight) element by element.
//
// Why: c10::Half's conversion is a call per element inside such loops (at::vec::half2float_scalar), which does not
// vectorise: an fp16 LoRA term took 11x a bf16 one at M = 1 (a 2-bit 4096 x 4096 layer with rank 64: 3.8x the
// whole call) and an fp16 dense GEMV 15x (docs/NOTES.md). Rows are converted here first, with F16C (16 or 8 values
// an instruction), then read as fp32.
#pragma once

#include <stdint.h>

namespace saliq {

// dst[i] = the fp16 value with bits src[i], for i in [0, n); exact for every half (subnormals, infinities, NaN).
void halves_to_floats(const uint16_t* src, float* dst, int64_t n);

}  // namespace saliq
