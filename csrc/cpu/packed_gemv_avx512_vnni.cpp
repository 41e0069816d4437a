// AVX-512 VNNI integer-dot-product GEMV (packed_gemv_int8.h): one vpdpbusd per 4 inputs x 16 columns x digit.
// Blocks: 64 columns for M = 1 (4 words of each row in flight), 32 columns in 4-row tiles for M > 1.
// Called only when the CPU has AVX512_VNNI and AVX512_VBMI and the AVX-512 path is active (packed_gemv_portable.cpp).
#include <algorithm>

#include "cpu/packed_gemv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")

#include "cpu/vec_avx512.h"

namespace {

struct VecVnni512 : VecAvx512 {
  static constexpr int kAccumulators = 18;  // of 32 zmm (tiles: 4 rows x 2 digits x 2, 3 x 3 x 2)
  static void prefetch(const int32_t* p, int vectors) {
    for (int v = 0; v < vectors; ++v) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * v), _MM_HINT_T0);
  }
  static constexpr bool kInt16Sums = false;  // vpdpbusd sums into int32 itself
  static I dot(I acc, I codes, I x) { return _mm512_dpbusd_epi32(acc, codes, x); }
  static I select(I mask, I a, I b) { return _mm512_ternarylogic_epi32(a, b, mask, 0xE4); }  // mask ? a : b
  // 3-bit: byte b of column word c of the result = bits 16 half + 4b - 2 .. + 5 of hi word c (vpmultishiftqb
  // takes 8 bits at any offset of the qword holding two columns), so bits 2..5 are the hi bits of k = 4b..4b+3
  // of the word row; the bits around them are removed after each shift.
  static I code3(I w, I hx, int j, I mask, I code3) {  // bits 0-1 from the lo word, bit 2 from the spread hi word
    return and_i(select(mask, srl(w, 2 * j), srl(hx, j)), code3);
  }
  static I spread_hi(I h, int half) {
    return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(half ? 0x3A36322E1A16120ELL : 0x2A26221E0A06023ELL), h);
  }
};

}  // namespace

#include "cpu/packed_gemv_int8.h"

namespace saliq {

int64_t int8x512_width(const PackedGemvProblem& p) { return p.M == 1 ? 64 : 32; }

void int8x512_columns(const PackedGemvProblem& p, const Int8Activations& a, int64_t n0, int64_t subs) {
  int8_columns<VecVnni512, 4, 2, 4>(p, a, n0, subs);
}

}  // namespace saliq

#pragma GCC pop_options
