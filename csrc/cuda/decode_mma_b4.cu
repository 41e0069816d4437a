// The 4-bit instances of the tensor-core decode kernel (decode_mma.cuh); one file per bit width so that
// the build compiles them in parallel.
#include "cuda/decode_mma.cuh"

namespace saliq_decode {
int launch_b4(const Launch& a, bool bf16) { return launch_bits<4>(a, bf16); }
}  // namespace saliq_decode
