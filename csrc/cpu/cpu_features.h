// Run-time choice of the SIMD code path: the CPU's features, optionally capped (SALIQ_CPU_ISA or
// set_isa_cap) so that tests can exercise the portable and AVX2 paths on an AVX-512 machine.
#pragma once

namespace saliq {

enum class CpuIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

CpuIsa detected_isa();           // best path this CPU supports
CpuIsa active_isa();             // detected, capped by the cap below
void set_isa_cap(CpuIsa cap);    // initial cap: SALIQ_CPU_ISA=portable|avx2|avx512, else none
const char* isa_name(CpuIsa isa);
bool has_avx512_bf16();         // AVX512_BF16 present and the AVX-512 path active
bool has_avx512_vnni_vbmi();         // AVX512_VNNI and AVX512_VBMI present, AVX-512 active

// How the small-M GEMV treats the activations (docs/OPS.md): Auto = int8 parts chosen per activation dtype,
// Exact = fp32 products of the codes with x, IntN = x quantized to N int8 parts for every dtype.
// Initial value: SALIQ_CPU_GEMV=auto|exact|int8x1|int8x2|int8x3, else auto.
enum class GemvPrecision : int { Auto = -1, Exact = 0, Int8x1 = 1, Int8x2 = 2, Int8x3 = 3 };
GemvPrecision gemv_precision();
void set_gemv_precision(GemvPrecision precision);
const char* gemv_precision_name(GemvPrecision precision);
bool parse_gemv_precision(const char* name, GemvPrecision* out);

}  // namespace saliq
