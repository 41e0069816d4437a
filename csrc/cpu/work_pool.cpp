// work_pool.h: indices claimed by the threads of an OpenMP region, and a back-off from parallel regions after a
// join that waited for a descheduled worker.
#include "cpu/work_pool.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>

namespace saliq {
namespace {

using Clock = std::chrono::steady_clock;

// A join that waits longer than this after the caller's last index (and longer than twice the caller's longest
// index: a block of the wide int8 GEMV takes a few hundred microseconds) waited for a thread that was not running.
// The longest, not the mean: a call's indices differ in size (QuantLinear's LoRA rows take microseconds, its
// blocks hundreds), and a healthy worker is at most one of them behind.
constexpr auto kStall = std::chrono::microseconds(300);
constexpr int64_t kMinBackoff = 64, kMaxBackoff = 1 << 14;

// Per calling thread: calls left to run alone, the length of the next back-off, and which of its last 8 parallel
// calls stalled (bit 0 the latest). One stall alone is a worker the host paused once (a shared VM does that every
// few hundred calls, and 64 calls on one thread then cost ~30x the wait); another process holding the core stalls
// call after call, so two among the last 8 back off.
thread_local int64_t t_serial_left = 0;
thread_local int64_t t_backoff = kMinBackoff;
thread_local uint32_t t_stalls = 0;
constexpr int kStallsToBackOff = 2;
std::atomic<int64_t> g_serial_calls{0};

// Spins until every index is done, for at most as long as this thread's longest index took (each other thread is
// inside its last one), within [kMinSpin, kStall]. Why: the region's closing barrier is where a thread that
// finishes early would wait, and with passive OpenMP waiting it sleeps there; on a 2-core VM waking it (or being
// woken) then cost the caller 20-30 us after the last index (a C++ harness, 2-bit 11008 x 4096 on 2 threads: the
// region ended 21-32 us after the last index, 6-8 us with the spin).
void wait_for_last(const std::atomic<int64_t>& done, int64_t n, Clock::duration longest) {
  constexpr auto kMinSpin = std::chrono::microseconds(20);
  const auto limit = Clock::now() + std::min<Clock::duration>(kStall, std::max<Clock::duration>(kMinSpin, longest));
  for (int spins = 0; done.load(std::memory_order_acquire) < n; ++spins) {
    cpu_relax();
    if ((spins & 63) == 63 && Clock::now() > limit) return;
  }
}

}  // namespace

void run_claimed(int64_t n, int threads, void (*fn)(void* ctx, int64_t i), void* ctx) {
  if (n <= 0) return;
  if (threads > 1 && n > 1 && t_serial_left > 0) {
    --t_serial_left;
    g_serial_calls.fetch_add(1, std::memory_order_relaxed);
    threads = 1;
  }
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  std::atomic<int64_t> next{0}, done{0};
  Clock::time_point caller_done;
  Clock::duration caller_longest{};
#pragma omp parallel num_threads(threads)
  {
    Clock::time_point finished = Clock::now();  // of this thread's latest index (or the region's start)
    Clock::duration longest{};
    int64_t mine = 0;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(ctx, i);
      ++mine;
      const Clock::time_point now = Clock::now();
      longest = std::max(longest, now - finished);
      finished = now;
    }
    if (omp_get_thread_num() == 0) caller_done = finished, caller_longest = longest;
    if (done.fetch_add(mine, std::memory_order_acq_rel) + mine < n) wait_for_last(done, n, longest);
  }
  const auto waited = Clock::now() - caller_done;
  const bool stalled = waited > kStall && waited > 2 * caller_longest;
  t_stalls = ((t_stalls << 1) | (stalled ? 1u : 0u)) & 0xFFu;
  if (stalled && __builtin_popcount(t_stalls) >= kStallsToBackOff) {
    t_serial_left = t_backoff;
    t_backoff = t_backoff * 2 < kMaxBackoff ? t_backoff * 2 : kMaxBackoff;
  } else if (!stalled && t_backoff > kMinBackoff) {
    --t_backoff;  // recover slowly while parallel calls go well
  }
}

int64_t run_claimed_serial_calls() { return g_serial_calls.load(std::memory_order_relaxed); }

}  // namespace saliq
