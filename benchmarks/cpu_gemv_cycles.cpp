// Cycles per word row of the int8 GEMV block kernels (packed_gemv_int8.h), called directly: no Python, no
// threads, no work pool. A word row is 16 columns x 16 inputs (2-, 3-bit; 8 inputs at 4-bit). With the weights
// small enough for L2 (the default 1040 x 1024) the figure is the kernel's own compute rate, and it repeats to a
// few percent on a machine whose DRAM timings drift by 20-30% (the best of many calls); with `cold` a 64 MiB
// buffer is streamed before each call and the median reported (weights from DRAM, as in a decode step).
//
//   make gemv-cycles                                            # the standard cases
//   build/cpu_gemv_cycles FORM N K BITS DIGITS [M] [CALLS] [cold|warm] [cpu|v1]
//   # FORM: avx2 | avx2vnni | vnni | novbmi | mad; the words in the CPU word order (as a QuantLinear on the CPU
//   # keeps them, csrc/cpu/word_order.h; the default) or in format v1
//
// Each form runs as the plan picks it under that form's cap (plan_packed_gemv, packed_gemv_block); the clock is
// measured (cpu_clock.h), so cycles mean the same on every machine.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/packed_gemv.h"
#include "cpu_clock.h"

using namespace saliq;

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr,
                 "usage: %s avx2|avx2vnni|vnni|novbmi|mad N K BITS DIGITS [M=1] [CALLS=2000] [cold|warm] [cpu|v1]\n",
                 argv[0]);
    return 2;
  }
  // each form is the one plan_packed_gemv picks under a cap: vnni the AVX-512 VNNI + VBMI form (no cap), novbmi
  // AVX-512 VNNI without VBMI (Cascade Lake), mad AVX-512 BW without VNNI (Skylake-SP), avx2vnni the 256-bit VNNI
  // form (VEX, or EVEX on an AVX-512 CPU), avx2 the AVX2 form
  struct Form {
    const char* name;
    IsaCap cap;
    GemvKernel kernel, kernel2;
  };
  const Form forms[] = {{"vnni", IsaCap::Avx512, GemvKernel::Int8x512, GemvKernel::Int8x512},
                        {"novbmi", IsaCap::Avx512Vnni, GemvKernel::Int8x512NoVbmi, GemvKernel::Int8x512NoVbmi},
                        {"mad", IsaCap::Avx512Bw, GemvKernel::Int8x512Mad, GemvKernel::Int8x512Mad},
                        {"avx2vnni", IsaCap::Avx2Vnni, GemvKernel::Int8x256Vnni, GemvKernel::Int8x256VnniEvex},
                        {"avx2", IsaCap::Avx2, GemvKernel::Int8x256, GemvKernel::Int8x256}};
  const Form* form = nullptr;
  for (const Form& f : forms)
    if (std::strcmp(argv[1], f.name) == 0) form = &f;
  if (form == nullptr) {
    std::fprintf(stderr, "unknown form %s: avx2, avx2vnni, vnni, novbmi or mad\n", argv[1]);
    return 2;
  }
  set_isa_cap(form->cap);
  const int64_t N = atol(argv[2]), K = atol(argv[3]), M = argc > 6 ? atol(argv[6]) : 1;
  const int bits = atoi(argv[4]), parts = atoi(argv[5]), calls = argc > 7 ? atoi(argv[7]) : 2000;
  const bool cold = argc > 8 && std::strcmp(argv[8], "cold") == 0;
  const bool v1 = argc > 9 && std::strcmp(argv[9], "v1") == 0;
  set_gemv_precision((GemvPrecision)parts);
  const int64_t group = 64, G = K / group, per_word = bits == 4 ? 8 : 16;
  std::mt19937 rng(1);
  std::vector<int32_t> qweight(K / per_word * N), qweight_hi(K / 32 * N);
  for (auto& v : qweight) v = (int32_t)rng();
  for (auto& v : qweight_hi) v = (int32_t)rng();
  std::vector<float> scales(G * N), x(M * K), x_group_sum(M * G), y(M * N);
  std::vector<int16_t> zeros(G * N);
  for (auto& v : scales) v = 0.01f * (float)(rng() % 100 + 1);
  for (auto& v : zeros) v = (int16_t)(rng() % (1u << bits));
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(rng);
  PackedGemvProblem p{};
  p.x = x.data();
  p.x_group_sum = x_group_sum.data();
  p.M = M, p.K = K, p.k_padded = K, p.N = N, p.G = G, p.group_len = group, p.bits = bits;
  p.qweight = qweight.data();
  p.qweight_hi = bits == 3 ? qweight_hi.data() : nullptr;
  // random words: either order is a valid weight; what differs is where each word is read
  p.lo = {N, K / per_word, v1 ? 1 : cpu_order_band(bits == 4 ? 4 : 2)};
  p.hi = {N, K / 32, v1 ? 1 : cpu_order_band(1)};
  p.scales = scales.data();
  p.scale_type = ScaleType::F32;
  p.zeros = zeros.data();
  p.y = y.data();
  // one thread's plan: one block of the form's tiles (then portable columns past the last whole tile); made on
  // every call, so timed too (mostly the activation digits)
  PackedGemvPlan plan;
  double prep = 1e9;
  for (int c = 0; c < 200; ++c) {
    const double t = seconds();
    plan_packed_gemv(p, 1, plan);
    prep = std::min(prep, seconds() - t);
  }
  if (plan.kernel != form->kernel && plan.kernel != form->kernel2) {
    std::printf("%s: this CPU lacks the form's extensions\n", argv[1]);
    return 0;
  }
  int64_t n0 = 0, n1 = 0;
  std::vector<float> flush(cold ? (64 << 20) / 4 : 1);
  std::vector<double> times;
  for (int c = 0; c < calls; ++c) {
    if (cold)
      for (size_t i = 0; i < flush.size(); i += 16) flush[i] += 1.0f;
    const double t = seconds();
    packed_gemv_block(p, plan, 0, &n0, &n1);
    times.push_back(seconds() - t);
  }
  std::sort(times.begin(), times.end());
  const double t = cold ? times[times.size() / 2] : times[0];
  const double hz = clock_hz();
  const double word_rows = (double)(K / per_word) * (double)((n1 - n0) / 16) * (double)M;
  std::printf("%s %ld x %ld, %d-bit, %d digit(s), M = %ld, %s: %.1f us (%s), %.1f cycles per word row of 16 "
              "columns (clock %.2f GHz); plan with its activation digits %.1f us\n",
              argv[1], (long)N, (long)K, bits, parts, (long)M, v1 ? "format v1" : "CPU word order", t * 1e6,
              cold ? "median, from DRAM" : "best",
              t * hz / word_rows, hz / 1e9, prep * 1e6);
  return 0;
}
