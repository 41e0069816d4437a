// Software prefetch with the cache level chosen at run time.
//
// Inline asm, not _mm_prefetch: GCC 12 merges `if (l2) _mm_prefetch(p, _MM_HINT_T1); else _mm_prefetch(p,
// _MM_HINT_T0);` into one prefetch whose hint is no longer a constant, and then drops it without a warning (the
// int8 GEMV kernels were built with no prefetch at all; tests/test_cpp_machine_code.py now looks for them).
#pragma once

#include <stdint.h>

namespace saliq {

enum class PrefetchTo : int { kNone = 0, kL1 = 1, kL2 = 2 };

inline void prefetch_line(const void* p, PrefetchTo to) {
  if (to == PrefetchTo::kL1) __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else if (to == PrefetchTo::kL2) __asm__ volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
}

// The 64-byte lines of `bytes` bytes from p.
inline void prefetch_lines(const void* p, int64_t bytes, PrefetchTo to) {
  for (int64_t b = 0; b < bytes; b += 64) prefetch_line(static_cast<const char*>(p) + b, to);
}

}  // namespace saliq
