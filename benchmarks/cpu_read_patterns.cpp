// How fast the bytes of a packed 2-bit g64 weight (codes, fp32 scales, int16 zeros) come from DRAM when read in
// the order the CPU int8 GEMV reads them, against reading the same number of bytes straight through: loads and
// integer adds only, no unpacking and no dot products, caches flushed before every pass, median of the passes.
//
//   sequential   one array of the same size, each thread a contiguous share
//   v1 panels    format v1 ([K/16, N] words, word rows N words apart) as packed_gemv_int8.h walks it: each thread
//                one block of columns, panel by panel (the 4 word rows of 64 inputs, then the group's scales and
//                zeros), 64 columns at a time, so a panel is 6 runs in 6 pages read side by side
//   v1 + prefetch  the same, prefetching the next panel's rows at the same columns into L1 (as the kernel does)
//   panel order  the words of each panel stored strip by strip (16 columns x 4 word rows together), scales and
//                zeros as in v1: the codes become one stream
//
//   make read-patterns                      # 11008 x 4096, 1 thread and all threads
//   build/cpu_read_patterns N K THREADS [PASSES]
//
// Needs AVX2 (256-bit loads); the figures depend on the memory system, not on the vector width.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_clock.h"

namespace {

constexpr int64_t kTile = 64;       // columns per step, as the AVX-512 VNNI form's M = 1 tile at 2 bits
constexpr int64_t kPanelRows = 4;   // word rows of 64 inputs at 2 bits
constexpr int64_t kStrip = 16;      // columns whose panel words are stored together in the panel order

struct Weight {
  int64_t n, k, rows, groups;
  int32_t* words;  // [rows, n] (v1) or the panel order
  float* scales;   // [groups, n]
  int16_t* zeros;  // [groups, n]
  int64_t bytes() const { return rows * n * 4 + groups * n * 6; }
};

inline __m256i add_run(__m256i acc, const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 32)
    acc = _mm256_add_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + o)));
  return acc;
}

// columns [c0, c1), panel by panel; `panel_order`: the words of a panel are strips of kStrip columns x 4 rows
__m256i walk(const Weight& w, int64_t c0, int64_t c1, bool panel_order, bool prefetch) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t r0 = g * kPanelRows;
    for (int64_t c = c0; c < c1; c += kTile) {
      if (panel_order) {  // 4 strips of 4 rows x 16 words, one run of 1 KiB
        acc = add_run(acc, w.words + r0 * w.n + c * kPanelRows, kTile * kPanelRows * 4);
      } else {
        for (int64_t r = r0; r < r0 + kPanelRows; ++r) {
          acc = add_run(acc, w.words + r * w.n + c, kTile * 4);
          if (prefetch)
            for (int64_t o = 0; o < kTile * 4; o += 64)
              _mm_prefetch(reinterpret_cast<const char*>(w.words + (r + kPanelRows) * w.n + c) + o, _MM_HINT_T0);
        }
      }
      acc = add_run(acc, w.scales + g * w.n + c, kTile * 4);
      acc = add_run(acc, w.zeros + g * w.n + c, kTile * 2);
    }
  }
  return acc;
}

int sum_lanes(__m256i v) {
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  int s = 0;
  for (int i = 0; i < 8; ++i) s += l[i];
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s N K THREADS [PASSES=31]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), k = std::atoll(argv[2]);
  const int threads = std::atoi(argv[3]), passes = argc > 4 ? std::atoi(argv[4]) : 31;
  if (n % kTile || k % 64 || n <= 0 || k <= 0 || threads < 1 || passes < 1) {
    std::fprintf(stderr, "N must be a positive multiple of %ld, K of 64, THREADS and PASSES positive (got N = %ld, "
                 "K = %ld, THREADS = %d, PASSES = %d)\n", (long)kTile, (long)n, (long)k, threads, passes);
    return 2;
  }
  Weight w{n, k, k / 16, k / 64, nullptr, nullptr, nullptr};
  auto alloc = [](int64_t bytes) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    std::memset(p, 1, bytes);
    return p;
  };
  w.words = static_cast<int32_t*>(alloc(w.rows * n * 4));
  w.scales = static_cast<float*>(alloc(w.groups * n * 4));
  w.zeros = static_cast<int16_t*>(alloc(w.groups * n * 2));
  char* flat = static_cast<char*>(alloc(w.bytes()));
  const int64_t flush_bytes = 64 << 20;
  std::vector<char> flush(flush_bytes, 0);

  const char* names[] = {"sequential", "v1 panels", "v1 + prefetch", "panel order"};
  constexpr int kPatterns = 4;
  std::vector<std::vector<double>> times(kPatterns);
  volatile int sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    for (int pat = 0; pat < kPatterns; ++pat) {
      for (int64_t i = 0; i < flush_bytes; i += 64) flush[i]++;  // dirty, as a decode step's other work leaves it
      const double t0 = seconds();
#pragma omp parallel num_threads(threads)
      {
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
        __m256i acc;
        if (pat == 0) {
          const int64_t share = w.bytes() / nt / 64 * 64;
          acc = add_run(_mm256_setzero_si256(), flat + id * share, share);
        } else {  // a contiguous share of the tiles per thread
          const int64_t tiles = n / kTile;
          acc = walk(w, id * tiles / nt * kTile, (id + 1) * tiles / nt * kTile, pat == 3, pat == 2);
        }
        const int s = sum_lanes(acc);
#pragma omp atomic
        sink += s;
      }
      times[pat].push_back(seconds() - t0);
    }
  }
  std::printf("%ld x %ld, 2-bit g64 (%.1f MB), %d thread(s), median of %d passes, caches flushed\n", (long)n, (long)k,
              w.bytes() / 1e6, threads, passes);
  double seq = 0;
  for (int pat = 0; pat < kPatterns; ++pat) {
    std::vector<double>& t = times[pat];
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    const double med = t[t.size() / 2];
    if (pat == 0) seq = med;
    std::printf("  %-14s %7.3f ms %6.1f GB/s  %.2fx sequential's time\n", names[pat], med * 1e3, w.bytes() / med / 1e9,
                med / seq);
  }
  return 0;
}
