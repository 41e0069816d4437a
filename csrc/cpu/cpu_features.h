// Run-time choice of the SIMD code path: the CPU's features, optionally capped (SALIQ_CPU_ISA or
// set_isa_cap) so that tests can exercise every path on one machine: portable, AVX2 (with or without 256-bit VNNI),
// and the AVX-512 of three CPU generations (F/BW/VL only, as Skylake-SP; + VNNI, as Cascade Lake; + everything
// else detected).
#pragma once

namespace saliq {

enum class CpuIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

// Caps, in order: Avx2 allows AVX2/FMA/F16C, Avx2Vnni adds 256-bit VNNI (AVX-VNNI, as Alder Lake or Sierra
// Forest have it), Avx512Bw allows AVX-512 F/BW/VL (no VNNI: Skylake-SP), Avx512Vnni adds VNNI, Avx512 whatever
// the CPU has (VBMI, BF16, ...).
enum class IsaCap : int { Portable = 0, Avx2 = 1, Avx2Vnni = 2, Avx512Bw = 3, Avx512Vnni = 4, Avx512 = 5 };

CpuIsa detected_isa();           // best path this CPU supports
CpuIsa active_isa();             // detected, capped by the cap below
void set_isa_cap(IsaCap cap);    // initial: SALIQ_CPU_ISA=portable|avx2|avx2vnni|avx512bw|avx512vnni|avx512, else none
bool parse_isa_cap(const char* name, IsaCap* out);
const char* isa_name(CpuIsa isa);
const char* active_isa_name();   // the active path, named as the cap that selects it (avx2vnni, avx512vnni, ...)
bool has_avx512_bf16();          // AVX512_BF16 present, the AVX-512 path active and not capped below it
bool has_avx512_vnni();          // AVX512_VNNI likewise
bool has_avx512_vbmi();          // AVX512_VBMI likewise

// 256-bit VNNI (vpdpbusd on ymm) for the AVX2 path: the VEX encoding of AVX-VNNI (Intel client cores from Alder
// Lake, Sierra Forest), or the EVEX encoding of AVX512_VNNI + VL on an AVX-512 CPU capped to avx2vnni (the same
// instruction, so the form is tested and measured there). None on the AVX-512 path, below the avx2vnni cap, or
// without either extension.
enum class Vnni256 : int { None = 0, Vex = 1, Evex = 2 };
Vnni256 vnni256();

// Whether this compiler knows AVX-VNNI (its intrinsics and __builtin_cpu_supports("avxvnni"): GCC 11, clang 12);
// without it the VEX form is not built and vnni256() never reports it. -DSALIQ_HAS_AVXVNNI=0 builds as such a
// compiler would.
#ifndef SALIQ_HAS_AVXVNNI
#if (defined(__x86_64__) || defined(__i386__)) && defined(__has_include)
#if __has_include(<avxvnniintrin.h>)
#define SALIQ_HAS_AVXVNNI 1
#endif
#endif
#endif
#ifndef SALIQ_HAS_AVXVNNI
#define SALIQ_HAS_AVXVNNI 0
#endif

// How the small-M GEMV treats the activations (docs/OPS.md): Auto = int8 parts chosen per activation dtype,
// Exact = fp32 products of the codes with x, IntN = x quantized to N int8 parts for every dtype.
// Initial value: SALIQ_CPU_GEMV=auto|exact|int8x1|int8x2|int8x3, else auto.
enum class GemvPrecision : int { Auto = -1, Exact = 0, Int8x1 = 1, Int8x2 = 2, Int8x3 = 3 };
GemvPrecision gemv_precision();
void set_gemv_precision(GemvPrecision precision);
const char* gemv_precision_name(GemvPrecision precision);
bool parse_gemv_precision(const char* name, GemvPrecision* out);

}  // namespace saliq
