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

}  // namespace saliq
