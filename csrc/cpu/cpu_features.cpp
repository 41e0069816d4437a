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

// A setting held in `slot` as an int: until a setter stores one (or at first use), read from the environment
// variable `name` by `parse`, `fallback` when unset or not a known name. `unread` is no value of T.
template <class T>
T setting(std::atomic<int>& slot, int unread, const char* name, bool (*parse)(const char*, T*), T fallback) {
  int v = slot.load();
  if (v == unread) {
    T from_env = fallback;
    const char* text = std::getenv(name);
    if (text != nullptr) parse(text, &from_env);
    v = (int)from_env;
    slot.store(v);
  }
  return (T)v;
}

const char* const kCapNames[] = {"portable", "avx2", "avx2vnni", "avx512bw", "avx512vnni", "avx512"};
constexpr int kCaps = sizeof(kCapNames) / sizeof(kCapNames[0]);

std::atomic<int> g_cap{-1};  // an IsaCap; -1: not read from the environment yet

IsaCap cap() { return setting(g_cap, -1, "SALIQ_CPU_ISA", parse_isa_cap, IsaCap::Avx512); }

// An AVX-512 extension usable now: present, the AVX-512 path active, and the cap at least `needs`.
bool extension(bool present, IsaCap needs) {
  return present && active_isa() == CpuIsa::Avx512 && (int)cap() >= (int)needs;
}

}  // namespace

bool parse_isa_cap(const char* name, IsaCap* out) {
  for (int i = 0; i < kCaps; ++i)
    if (std::strcmp(name, kCapNames[i]) == 0) {
      *out = (IsaCap)i;
      return true;
    }
  return false;
}

CpuIsa detected_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

void set_isa_cap(IsaCap c) { g_cap.store((int)c); }

CpuIsa active_isa() {
  const int c = (int)cap();
  const CpuIsa capped = c >= (int)IsaCap::Avx512Bw ? CpuIsa::Avx512
                        : c >= (int)IsaCap::Avx2   ? CpuIsa::Avx2
                                                   : CpuIsa::Portable;
  return (int)capped < (int)detected_isa() ? capped : detected_isa();
}

const char* active_isa_name() {
  const CpuIsa isa = active_isa();
  if (isa == CpuIsa::Avx2 && vnni256() != Vnni256::None) return kCapNames[(int)IsaCap::Avx2Vnni];
  return isa == CpuIsa::Avx512 ? kCapNames[(int)cap()] : isa_name(isa);
}

// __builtin_cpu_supports takes a string literal only
#if defined(__x86_64__) || defined(__i386__)
#define SALIQ_CPU_HAS(feature) __builtin_cpu_supports(feature)
#else
#define SALIQ_CPU_HAS(feature) false
#endif

bool has_avx512_bf16() {
  static const bool present = SALIQ_CPU_HAS("avx512bf16");
  return extension(present, IsaCap::Avx512);
}

bool has_avx512_vnni() {
  static const bool present = SALIQ_CPU_HAS("avx512vnni");
  return extension(present, IsaCap::Avx512Vnni);
}

bool has_avx512_vbmi() {
  static const bool present = SALIQ_CPU_HAS("avx512vbmi");
  return extension(present, IsaCap::Avx512);
}

Vnni256 vnni256() {
#if SALIQ_HAS_AVXVNNI
  static const bool vex = SALIQ_CPU_HAS("avxvnni");
#else
  constexpr bool vex = false;
#endif
  static const bool evex = SALIQ_CPU_HAS("avx512vnni") && SALIQ_CPU_HAS("avx512vl");
  if (active_isa() != CpuIsa::Avx2 || (int)cap() < (int)IsaCap::Avx2Vnni) return Vnni256::None;
  return vex ? Vnni256::Vex : (evex ? Vnni256::Evex : Vnni256::None);
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
  return setting(g_precision, -2, "SALIQ_CPU_GEMV", parse_gemv_precision, GemvPrecision::Auto);
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
