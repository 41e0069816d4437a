// The reserved weights of a quantized layer in slices of 16 output rows (a SELL-16 form of their CSR, built by
// saliq/sparse_slices.py csr_slices), for the CPU's y += x Sp^T right after the packed matmul. Torch-free.
//
// Why slices: a CSR row of ~20-60 nonzeros costs a horizontal sum and scalar gathers per row; a slice puts the
// j-th nonzero of its 16 rows side by side (16 row sums advance together, in registers), and the rows are sorted
// by their count (most first) so that the lanes still holding a nonzero at slot j are a prefix: slot_lanes[j] of
// them. Columns are int16 when K fits, values fp32, so a nonzero costs 6 bytes.
#pragma once

#include <stdint.h>

namespace saliq {

struct SliceProblem {
  const float* x;             // [M, ldx] fp32
  int64_t M, ldx, N;          // N: rows of Sp (columns of y)
  int64_t slices;             // ceil(N / 16)
  const int32_t* slot_ptr;    // [slices + 1]: slots of slice s are slot_ptr[s] .. slot_ptr[s + 1]
  const uint8_t* slot_lanes;  // [slots]: lanes 0 .. slot_lanes[j] - 1 hold a nonzero at slot j
  const int32_t* lane_rows;   // [slices * 16]: the row of each lane (-1 past N)
  const void* cols;           // [slots * 16] int16 or int32 (cols_are_i16), 0 in unused lanes
  bool cols_are_i16;
  const float* vals;          // [slots * 16] fp32, 0 in unused lanes
};

constexpr int kSliceLanes = 16;
constexpr int64_t kSlicesPerChunk = 32;  // a few thousand nonzeros per claimed chunk: a few microseconds

inline int64_t slice_chunks(const SliceProblem& p) { return (p.slices + kSlicesPerChunk - 1) / kSlicesPerChunk; }

// For the slices of chunk c: delta[m * N + row] = sum over the row's nonzeros of vals * x[m, col] (fp32, in CSR
// order) for every row of x and every row of Sp there holding a nonzero; other entries are left as they are.
void slice_chunk_sums(const SliceProblem& p, int64_t c, float* delta);

}  // namespace saliq
