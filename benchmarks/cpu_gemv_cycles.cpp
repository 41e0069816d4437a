// Cycles per word row of the int8 GEMV block kernels (packed_gemv_int8.h), called directly: no Python, no
// threads, no work pool. A word row is 16 columns x 16 inputs (2-, 3-bit; 8 inputs at 4-bit). With the weights
// small enough for L2 (the default 1040 x 1024) the figure is the kernel's own compute rate, and it repeats to a
// few percent on a machine whose DRAM timings drift by 20-30% (the best of many calls); with `cold` a 64 MiB
// buffer is streamed before each call and the median reported (weights from DRAM, as in a decode step).
//
//   make gemv-cycles                                            # the standard cases
//   build/cpu_gemv_cycles FORM N K BITS DIGITS [M] [CALLS] [cold]   # FORM: avx2 | avx2vnni | vnni | novbmi | mad
//
// The clock is measured (a chain of dependent adds, one cycle each), so cycles mean the same on every machine.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/packed_gemv.h"

using namespace saliq;

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double clock_hz() {  // 8 dependent adds per iteration: one cycle each
  const long n = 200000000;
  long x = 0;
  const double t = seconds();
  for (long i = 0; i < n; i += 8)
    __asm__ volatile("add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0"
                     : "+r"(x));
  return n / (seconds() - t);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s avx2|avx2vnni|vnni|novbmi|mad N K BITS DIGITS [M=1] [CALLS=2000] [cold]\n",
                 argv[0]);
    return 2;
  }
  // vnni: the AVX-512 VNNI + VBMI form; novbmi: AVX-512 VNNI without VBMI (Cascade Lake); mad: AVX-512 BW
  // without VNNI (Skylake-SP); avx2vnni: the 256-bit VNNI form (VEX, or EVEX on an AVX-512 CPU)
  const bool vnni = std::strcmp(argv[1], "vnni") == 0, vnni256_form = std::strcmp(argv[1], "avx2vnni") == 0;
  const bool novbmi = std::strcmp(argv[1], "novbmi") == 0, mad = std::strcmp(argv[1], "mad") == 0;
  const bool zmm = vnni || novbmi || mad;  // a 16-lane form
  if (vnni256_form) set_isa_cap(IsaCap::Avx2Vnni);
  else if (novbmi) set_isa_cap(IsaCap::Avx512Vnni);
  else if (mad) set_isa_cap(IsaCap::Avx512Bw);
  else if (!vnni) set_isa_cap(IsaCap::Avx2);
  const int64_t N = atol(argv[2]), K = atol(argv[3]), M = argc > 6 ? atol(argv[6]) : 1;
  const int bits = atoi(argv[4]), parts = atoi(argv[5]), calls = argc > 7 ? atoi(argv[7]) : 2000;
  const bool cold = argc > 8 && std::strcmp(argv[8], "cold") == 0;
  const bool avx512 = active_isa() == CpuIsa::Avx512;
  if (vnni     ? !(avx512 && has_avx512_vnni() && has_avx512_vbmi())
      : novbmi ? !(avx512 && has_avx512_vnni())
      : mad    ? !avx512
      : vnni256_form ? vnni256() == Vnni256::None
                     : active_isa() == CpuIsa::Portable) {
    std::printf("%s: this CPU lacks the form's extensions\n", argv[1]);
    return 0;
  }
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
  p.scales = scales.data();
  p.scale_type = ScaleType::F32;
  p.zeros = zeros.data();
  p.y = y.data();
  Int8Activations act;  // as plan_packed_gemv makes them (timed: every call makes them, on one thread)
  double prep = 1e9;
  for (int c = 0; c < 200; ++c) {
    const double t = seconds();
    quantize_activations(p, parts, !zmm && M == 1 ? kInt8x256DigitReplicasM1 : 1, act);
    prep = std::min(prep, seconds() - t);
  }
  act.prefetch = N % 1024 == 0 ? PrefetchTo::kL2 : PrefetchTo::kL1;
  const int64_t width = zmm ? int8x512_width(p) : int8x256_width(p);
  std::vector<float> flush(cold ? (64 << 20) / 4 : 1);
  std::vector<double> times;
  for (int c = 0; c < calls; ++c) {
    if (cold)
      for (size_t i = 0; i < flush.size(); i += 16) flush[i] += 1.0f;
    const double t = seconds();
    if (vnni) int8x512_columns(p, act, 0, N / width);
    else if (novbmi) int8x512_novbmi_columns(p, act, 0, N / width);
    else if (mad) int8x512_mad_columns(p, act, 0, N / width);
    else if (vnni256_form && vnni256() == Vnni256::Vex) int8x256_vnni_columns(p, act, 0, N / width);
    else if (vnni256_form) int8x256_vnni_evex_columns(p, act, 0, N / width);
    else int8x256_columns(p, act, 0, N / width);
    times.push_back(seconds() - t);
  }
  std::sort(times.begin(), times.end());
  const double t = cold ? times[times.size() / 2] : times[0];
  const double hz = clock_hz();
  const double word_rows = (double)(K / per_word) * (double)(N / width * width / 16) * (double)M;
  std::printf("%s %ld x %ld, %d-bit, %d digit(s), M = %ld: %.1f us (%s), %.1f cycles per word row of 16 columns "
              "(clock %.2f GHz); activation digits %.1f us\n",
              argv[1], (long)N, (long)K, bits, parts, (long)M, t * 1e6, cold ? "median, from DRAM" : "best", t * hz / word_rows,
              hz / 1e9, prep * 1e6);
  return 0;
}
