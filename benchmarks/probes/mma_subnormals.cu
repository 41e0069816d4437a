// Does mma.sync m16n8k16 (fp32 accumulation) take subnormal fp16 / bf16 A operands exactly, or flush them?
// A decode kernel could then feed 2-bit codes masked into a half's low mantissa bits (value c q 2^-24) straight
// to the tensor cores, without the packed fma per code pair that turns 1024 + c q into q today (docs/NOTES.md,
// "GPU: third measured run"). Every element of A holds the same subnormal, every element of B the same normal
// value, so each output is 16 a b whatever the fragment layout; printed against that product in double.
//
//   nvcc -O2 -arch=native benchmarks/probes/mma_subnormals.cu -o mma_subnormals && ./mma_subnormals
// (make gpu-check runs it and keeps its output in the logs).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <cuda_runtime.h>

__global__ void mma_all_equal(uint32_t a, uint32_t b, int bf16, float* d) {
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  if (bf16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%4,%4,%4}, {%5,%5}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a), "r"(b));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%4,%4,%4}, {%5,%5}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a), "r"(b));
  }
  for (int i = 0; i < 4; ++i) d[threadIdx.x * 4 + i] = c[i];
}

static double half_value(uint16_t h) {  // IEEE fp16 bits -> double
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0 ? std::ldexp((double)m, -24) : std::ldexp(1024.0 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}
static double bf16_value(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return (double)f;
}

int main() {
  float* d = nullptr;
  if (cudaMalloc(&d, 32 * 4 * sizeof(float)) != cudaSuccess) { std::printf("no GPU\n"); return 2; }
  struct Case { const char* what; int bf16; uint16_t a, b; int informative; };
  const Case cases[] = {
      {"fp16 a = 3 * 2^-24 (2-bit code 3 at bit 0), b = 1.5", 0, 0x0003, 0x3E00, 0},
      {"fp16 a = 3 * 2^-18 (code 3 at bit 6), b = -0.71875", 0, 0x00C0, 0xB9C0, 0},
      {"fp16 a = 7 * 2^-16 (3-bit code 7 at bit 8), b = 6e-5 (a subnormal b too)", 0, 0x0380, 0x03EE, 0},
      {"fp16 a = 1 * 2^-24, b = 65504", 0, 0x0001, 0x7BFF, 0},
      {"bf16 a = 3 * 2^-133 (code 3 at bit 0), b = 1.5 * 2^100 (x scaled up)", 1, 0x0003, 0x71C0, 0},
      // the product is an fp32 subnormal: a flush here says bf16 x must be scaled up first, as the case above
      {"bf16 a = 3 * 2^-133, b = 1.5 (product below fp32's normal range; informative)", 1, 0x0003, 0x3FC0, 1},
  };
  int exact_all = 1;
  for (const Case& c : cases) {
    const uint32_t a = c.a | ((uint32_t)c.a << 16), b = c.b | ((uint32_t)c.b << 16);
    mma_all_equal<<<1, 32>>>(a, b, c.bf16, d);
    float h[128];
    if (cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost) != cudaSuccess) {
      std::printf("kernel failed\n");
      return 2;
    }
    const double av = c.bf16 ? bf16_value(c.a) : half_value(c.a), bv = c.bf16 ? bf16_value(c.b) : half_value(c.b);
    const double expect = 16.0 * av * bv;
    int exact = 1;
    for (int i = 0; i < 128; ++i) exact &= (double)h[i] == (double)(float)expect;
    if (!c.informative) exact_all &= exact;
    std::printf("%-72s got %.9g expected %.9g: %s\n", c.what, h[0], (double)(float)expect, exact ? "exact" : "DIFFERS");
  }
  std::printf("subnormal A operands: %s\n", exact_all ? "exact" : "NOT exact (see above)");
  return 0;
}
