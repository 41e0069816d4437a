// CPU feature detection with __builtin_cpu_supports; the AVX2 path needs AVX2+FMA+F16C, the AVX-512 path
// F+BW+VL (plus those of AVX2).
#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace saliq {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? CpuIsa::Avx512 : (avx2 ? CpuIsa::Avx2 : CpuIsa::Portable);
#else
  return CpuIsa::Portable;
#endif
}

CpuIsa cap_from_env() {
  const char* v = std::getenv("SALIQ_CPU_ISA");
  if (v == nullptr) return CpuIsa::Avx512;
  if (std::strcmp(v, "portable") == 0) return CpuIsa::Portable;
  if (std::strcmp(v, "avx2") == 0) return CpuIsa::Avx2;
  return CpuIsa::Avx512;
}

std::atomic<int> g_cap{-1};

}  // namespace

CpuIsa detected_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

void set_isa_cap(CpuIsa cap) { g_cap.store((int)cap); }

CpuIsa active_isa() {
  int cap = g_cap.load();
  if (cap < 0) {
    cap = (int)cap_from_env();
    g_cap.store(cap);
  }
  const int best = (int)detected_isa();
  return (CpuIsa)(cap < best ? cap : best);
}

bool has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return bf16 && active_isa() == CpuIsa::Avx512;
#else
  return false;
#endif
}

bool has_avx512_vnni_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  return vnni && active_isa() == CpuIsa::Avx512;
#else
  return false;
#endif
}

namespace {
std::atomic<int> g_precision{-2};  // -2: not read from the environment yet
}  // namespace

bool parse_gemv_precision(const char* name, GemvPrecision* out) {
  static const char* const names[] = {"auto", "exact", "int8x1", "int8x2", "int8x3"};
  for (int i = 0; i < 5; ++i)
    if (std::strcmp(name, names[i]) == 0) {
      *out = (GemvPrecision)(i - 1);
      return true;
    }
  return false;
}

const char* gemv_precision_name(GemvPrecision precision) {
  switch (precision) {
    case GemvPrecision::Exact: return "exact";
    case GemvPrecision::Int8x1: return "int8x1";
    case GemvPrecision::Int8x2: return "int8x2";
    case GemvPrecision::Int8x3: return "int8x3";
    default: return "auto";
  }
}

GemvPrecision gemv_precision() {
  int v = g_precision.load();
  if (v == -2) {
    GemvPrecision p = GemvPrecision::Auto;
    const char* env = std::getenv("SALIQ_CPU_GEMV");
    if (env != nullptr) parse_gemv_precision(env, &p);
    v = (int)p;
    g_precision.store(v);
  }
  return (GemvPrecision)v;
}

void set_gemv_precision(GemvPrecision precision) { g_precision.store((int)precision); }

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace saliq
