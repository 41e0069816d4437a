// Wall time and the core's clock for the CPU microbenchmarks (cpu_gemv_cycles.cpp, cpu_instruction_mix.py):
// the clock is measured (a chain of dependent adds, one cycle each), so cycles mean the same on every machine.
#pragma once

#include <chrono>

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double clock_hz() {  // 8 dependent adds per iteration: one cycle each
  const long n = 200000000;
  long x = 0;
  const double t = seconds();
  for (long i = 0; i < n; i += 8)
    __asm__ volatile("add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0"
                     : "+r"(x));
  return n / (seconds() - t);
}
