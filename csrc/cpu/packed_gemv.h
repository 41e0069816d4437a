// Interface of the small-M packed matmul kernels (y = x W^T, W in packed format v1), torch-free.
// The caller converts x to fp32, padded with zeros to a whole number of 32-element words per row, and
// precomputes per-group sums of x; each kernel covers a range of output columns and writes fp32 y.
#pragma once

#include <stdint.h>

#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/prefetch.h"
#include "cpu/word_order.h"

namespace saliq {

enum class ScaleType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct PackedGemvProblem {
  const float* x;          // [M, k_padded] fp32, zero past K
  const float* x_group_sum;  // [M, G] sum of x over each group
  int64_t M, K, k_padded, N, G, group_len;
  int bits;
  const int32_t* qweight;     // [ceil(K / codes per word), N]
  const int32_t* qweight_hi;  // 3-bit: [ceil(K / 32), N]
  PlaneOrder lo, hi;          // where each plane's words lie: format v1 or the CPU word order (word_order.h)
  const void* scales;         // [G, N]
  ScaleType scale_type;
  const int16_t* zeros;       // [G, N]
  const float* bias;          // [N] fp32 or null
  float* y;                   // [M, N] fp32
  bool x_is_bf16;             // x holds bf16 values (exactly representable): the bf16 dot-product path may run
  int x_dtype = 0;            // the caller's activation dtype: 0 fp32, 1 fp16, 2 bf16 (picks the int8 parts)
};

// The kernels compute whole blocks of columns. A plan, made once per call, picks the kernel for the active ISA
// and the shape and holds what every block shares (the LUT kernel's tables, the bf16 kernel's rearranged x);
// then any thread may compute any block, and each output element is written by exactly one block, so results do
// not depend on the schedule. Callers with their own parallel loop (quant_linear_ops.cpp) run blocks directly.
// Int8x512: VNNI + VBMI; Int8x512NoVbmi: VNNI; Int8x512Mad: AVX-512 BW only; Int8x256: AVX2; Int8x256Vnni /
// Int8x256VnniEvex: AVX2 with 256-bit VNNI (cpu_features.h: vnni256)
enum class GemvKernel : int {
  Lut, Bf16, Fma512, Fma256, Portable, Int8x512, Int8x512NoVbmi, Int8x512Mad, Int8x256, Int8x256Vnni, Int8x256VnniEvex
};

// Largest |Q| of `parts` digits (index) whose digits all stay in [-128, 127] with the top one in [-127, 127].
constexpr int32_t kInt8Qmax[4] = {0, 127, 32768 - 128 - 1, 8388608 - 32896 - 1};

// Activations quantized per (row, group) for the integer-dot-product kernels (packed_gemv_int8.h):
// x ~= unit * Q with Q = sum_p 256^(parts-1-p) part_p, each part an int8, so that integer codes times parts are
// exact int32 dot products (vpdpbusd). operands: [M][parts][k_padded / 4] int32, each holding the 4 int8 parts
// of the inputs one shifted and masked word of the weight plane pairs with (packed_gemv_int8_prep.cpp; a 3-bit
// word row pairs with the same ones, its hi bits merged into the codes), each written `replicas` times in a row.
struct Int8Activations {
  int parts = 0;
  // copies of each operand: at M = 1 the AVX2 kernel loads 8 as one vector, a plain load, where a broadcast from
  // memory costs a shuffle on Zen (12 per word row of three digits: a sixth of the loop's vector operations);
  // with more rows of x the copies would crowd L1 (16 rows at two digits: 16 KB a panel), so one copy there
  int replicas = 1;
  std::vector<int32_t> operands;  // [M][parts][k_padded / 4][replicas]
  std::vector<float> unit;      // [M][G]
  std::vector<float> part_sum;  // [M][G][parts] sum over the group of each part (integers)
  PrefetchTo prefetch = PrefetchTo::kL2;  // where the kernel fetches the next panel's rows
};

struct PackedGemvPlan {
  GemvKernel kernel = GemvKernel::Portable;
  int64_t block = 16;        // columns per block of the main kernel (int8 kernels: per register tile)
  int64_t main_columns = 0;  // leading columns the main kernel covers (whole blocks); the rest: portable blocks of 16
  int64_t int8_blocks = 0;   // int8 kernels: main_columns split into this many runs of whole tiles (see below)
  std::vector<float> tables;    // Lut: per row of x, the pair tables, then (3-bit) the hi tables
  std::vector<uint32_t> pairs;  // Bf16: x as pairs of bf16 values in the order the words hold the codes
  Int8Activations act;          // the Int8 kernels
};

constexpr int64_t kPortableBlock = 16;

// Chooses the kernel and builds the shared data (serial; a few microseconds). `threads`: how many will share
// the blocks (the int8 kernels make a few wide blocks per thread, see kInt8BlocksPerThread).
void plan_packed_gemv(const PackedGemvProblem& p, int threads, PackedGemvPlan& plan);
// Number of blocks of the plan over all N columns.
int64_t packed_gemv_blocks(const PackedGemvProblem& p, const PackedGemvPlan& plan);
// Computes block b (all rows of x) and returns its columns [*n0, *n1).
void packed_gemv_block(const PackedGemvProblem& p, const PackedGemvPlan& plan, int64_t b, int64_t* n0, int64_t* n1);
// Whether a call of this size is worth waking more threads for (small layers are faster on one).
bool packed_gemv_parallel(const PackedGemvProblem& p, int64_t extra_bytes = 0);

// Per-ISA block kernels (only callable when active_isa() allows them).
void portable_columns(const PackedGemvProblem& p, int64_t n0, int64_t nb);  // any nb <= kPortableBlock
constexpr int64_t kLutBlock = 64, kFma512Block = 32, kBf16Block = 32, kFma256Block = 16;
int64_t lut_table_floats(const PackedGemvProblem& p);  // per row of x
void lut_tables(const PackedGemvProblem& p, float* tables);
void lut_columns(const PackedGemvProblem& p, const float* tables, int64_t n0);
void fma512_columns(const PackedGemvProblem& p, int64_t n0);
void bf16_pairs(const PackedGemvProblem& p, uint32_t* pairs);  // [M, k_padded / 2]
void bf16_columns(const PackedGemvProblem& p, const uint32_t* pairs, int64_t n0);
void fma256_columns(const PackedGemvProblem& p, int64_t n0);

// Integer-dot-product kernels (activations quantized to int8 parts, see Int8Activations and docs/OPS.md).
// int8_parts_for: the parts the current setting asks for x of this problem (0: an exact kernel);
// quantize_activations: false when a group of x is not finite (the exact kernels then run, and propagate it).
int int8_parts_for(const PackedGemvProblem& p);
bool quantize_activations(const PackedGemvProblem& p, int parts, int replicas, Int8Activations& act);
// Why few wide blocks: a block walks its columns one group of rows (a panel) at a time, each word row of the
// panel read as one run over all the block's columns. Format v1 puts word rows N words apart, so narrow blocks
// read short runs in a different page each, which streamed from DRAM at ~13 GB/s per core on Zen 4 against
// ~28 GB/s for runs of a whole thread's share of the row (docs/NOTES.md). One block on one thread; with more,
// two per thread keep a late thread from holding up the call (blocks are claimed one at a time, work_pool.h).
// The second block per thread only where blocks stay at least kInt8MinBlockColumns wide (4096 x 11008 on 2
// threads: 4 blocks of 1024 columns took 0.89 ms for 2-bit, 2 of 2048 0.66 ms, after dense calls in between).
constexpr int64_t kInt8BlocksPerThread = 2;
constexpr int64_t kInt8MinBlockColumns = 2048;
// Each panel reads and writes the block's M x columns of y (fp32). More blocks where that would pass this, so y
// stays in L2 from one panel to the next (1 thread, 11008 x 4096, M = 16, bf16 x: one block's 704 KB of y left
// L2 on every panel, and 3-bit took 1.12x bf16 F.linear; in blocks of at most 256 KB 0.94x; docs/NOTES.md).
constexpr int64_t kInt8BlockYBytes = 256 << 10;
int64_t int8x512_width(const PackedGemvProblem& p, GemvKernel kernel);  // columns of the form's register tile
int64_t int8x256_width(const PackedGemvProblem& p);  // every 256-bit form
void int8x512_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
void int8x512_novbmi_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
void int8x512_mad_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
void int8x256_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
void int8x256_vnni_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
void int8x256_vnni_evex_columns(const PackedGemvProblem& p, const Int8Activations& act, int64_t n0, int64_t subs);
constexpr int kInt8x256DigitReplicasM1 = 8;  // Int8Activations::replicas the AVX2 forms read at M = 1

// Scale of group g, column n, as fp32.
float load_scale(const void* scales, ScaleType type, int64_t index);

}  // namespace saliq
