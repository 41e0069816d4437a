"""The reserved weights' CSR in slices of 16 output rows (a SELL-16 form), which the CPU kernel for y += x Sp^T
reads (csrc/cpu/sliced_sparse.h; ops.sparse_addmm_ uses it when given).

Rows are sorted by their number of nonzeros, most first (ties in row order), and taken 16 at a time: slot j of a
slice holds the j-th nonzero (in CSR order) of each of its rows side by side, so that 16 row sums advance together
(in registers, no horizontal sum per row), and the lanes that still hold a nonzero at slot j are a prefix
(slot_lanes[j] of them). Sorting keeps the padding small when rows hold very different counts.

    slot_ptr   int32 [S + 1]     slots of slice s: slot_ptr[s] .. slot_ptr[s + 1]   (S = ceil(N / 16))
    slot_lanes uint8 [slots]     lanes holding a nonzero at each slot
    lane_rows  int32 [S * 16]    the output row of each lane (-1 past N)
    cols       int16 [slots*16]  column of each nonzero (int32 when K > 32767; 0 in unused lanes)
    vals       fp32  [slots*16]  its value (0 in unused lanes)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LANES = 16


class Slices(NamedTuple):
    slot_ptr: Tensor
    slot_lanes: Tensor
    lane_rows: Tensor
    cols: Tensor
    vals: Tensor


def csr_slices(rowptr: Tensor, cols: Tensor, vals: Tensor, in_features: int) -> Slices:
    """Slices of a CSR (rowptr int32 [N + 1], cols [nnz], vals [nnz]) that validate.csr accepted."""
    device = cols.device
    n = rowptr.numel() - 1
    nnz = cols.numel()
    counts = rowptr.long().diff()
    order = torch.argsort(counts, descending=True, stable=True)
    n_slices = -(-n // LANES)
    sorted_counts = torch.zeros(n_slices * LANES, dtype=torch.long, device=device)
    sorted_counts[:n] = counts[order]
    per_lane = sorted_counts.view(n_slices, LANES)
    width = per_lane[:, 0]  # the slice's longest row (sorted, most first)
    slot_ptr = torch.cat([width.new_zeros(1), width.cumsum(0)])
    slots = int(slot_ptr[-1])
    slot_slice = torch.repeat_interleave(torch.arange(n_slices, device=device), width, output_size=slots)
    slot_j = torch.arange(slots, device=device) - slot_ptr[slot_slice]
    slot_lanes = (per_lane[slot_slice] > slot_j[:, None]).sum(1).to(torch.uint8)
    # every nonzero's place: its row's lane position, and its index j within the row
    position = torch.empty(n, dtype=torch.long, device=device)
    position[order] = torch.arange(n, device=device)
    rows = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=nnz)
    j = torch.arange(nnz, device=device) - rowptr.long()[rows]
    p = position[rows]
    index = (slot_ptr[p // LANES] + j) * LANES + p % LANES
    col_dtype = torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
    out_cols = torch.zeros(slots * LANES, dtype=col_dtype, device=device)
    out_cols[index] = cols.to(col_dtype)
    out_vals = torch.zeros(slots * LANES, dtype=torch.float32, device=device)
    out_vals[index] = vals.float()
    lane_rows = torch.full((n_slices * LANES,), -1, dtype=torch.int32, device=device)
    lane_rows[:n] = order.to(torch.int32)
    return Slices(slot_ptr.to(torch.int32), slot_lanes, lane_rows, out_cols, out_vals)
