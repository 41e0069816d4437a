// Sharing decode-sized work (tens of microseconds per call, hundreds of calls per generated token) between
// threads in a way that survives a busy machine.
//
// run_claimed(n, threads, fn) runs fn(i) for every i in [0, n) exactly once, on the calling thread and the other
// threads of torch's OpenMP team, which claim indices one at a time from a shared counter (so a thread that
// starts late simply gets fewer). Indices are claimed in increasing order, so fn(i) may wait for lower indices
// (each is running or done). The team is torch's own: a separate pool would add a third runnable thread next to
// torch's spinning OpenMP worker on a two-core machine and slow the caller down. Each parallel region costs a
// wake-up of the team (tens of microseconds on a VM with passive waiting), so a call runs all its work in one.
// A thread out of indices spins until the others finish theirs instead of sleeping at the region's closing
// barrier (work_pool.cpp: wait_for_last).
// The one hazard of a parallel region is its join: when another process holds the other core, the worker may
// not run for a whole scheduler slice (milliseconds) and the caller waits for it. run_claimed measures how long
// the caller waits after its last index; a wait far beyond one index's work means the worker was descheduled.
// Two such stalls among the caller's last 8 parallel calls (a core held by another process, not a one-off pause
// of a virtual CPU) make the next calls run on the calling thread alone, for a number of calls that doubles with
// every further stall (and shrinks again while parallel calls go well).
#pragma once

#include <stdint.h>

namespace saliq {

// Calls fn(ctx, i) for i in [0, n). `threads` (caller included) caps the team; <= 1 runs on the caller.
void run_claimed(int64_t n, int threads, void (*fn)(void* ctx, int64_t i), void* ctx);

template <class F>
void run_claimed(int64_t n, int threads, F& f) {
  run_claimed(n, threads, [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }, &f);
}

// Calls run on the calling thread alone after stalls so far (for tests and benchmarks).
int64_t run_claimed_serial_calls();

// The pause of a spin-wait loop (for an index that waits on indices claimed before it: they are all running or
// done, so it never waits on one that no thread has taken).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace saliq
