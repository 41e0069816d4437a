"""Outlier reservation (PB-LLM, SqueezeLLM's dense-and-sparse): a small fraction of each linear's weights is kept
exactly in 16 bits next to the packed codes and takes no part in its group's quantization.

Selection: per linear, the `fraction` of weights with the largest score,
  "error":     S * (W - RTN(W))^2  the saliency-weighted error min-max rounding would make there;
  "magnitude": S * W^2             the diagonal-Fisher estimate of the loss change if the weight were lost (OBD).
A reserved weight is stored as fp16 (bf16 where fp16 would overflow), and calibration trains against exactly that
value. Its group is quantized as if it held the mean of the group's other weights there (inside their range, so
the outlier no longer stretches the scale); at inference the packed matmul is followed by the sparse correction
`value - What` at those positions (`ops.sparse_addmm`, docs/FORMAT.md "Reserved weights")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ref
from .spec import QuantSpec

SCORES = ("error", "magnitude")
FP16_MAX = 65504.0


def reserved_dtype(W: Tensor) -> torch.dtype:
    """fp16 (more mantissa) unless some weight is beyond its range."""
    return torch.float16 if float(W.abs().max()) <= FP16_MAX else torch.bfloat16


def select(W: Tensor, S: Optional[Tensor], spec: QuantSpec, fraction: float, score: str = "error") -> Tensor:
    """Bool mask [N, K] of the round(fraction * N * K) weights with the largest score (ties: lowest index)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must lie in [0, 1)")
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; allowed: {SCORES}")
    count = int(round(fraction * W.numel()))
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    if count == 0:
        return mask
    Wf = W.float()
    if score == "error":
        value = (ref.rtn_dequantized(Wf, spec.bits, spec.group_size, spec.symmetric) - Wf) ** 2
    else:
        value = Wf ** 2
    if S is not None:
        value = value * S.float()
    idx = torch.topk(value.flatten(), count, sorted=False).indices
    mask.view(-1)[idx] = True
    return mask


def fill_reserved(W: Tensor, mask: Tensor, spec: QuantSpec) -> Tensor:
    """W with each reserved weight replaced by the mean of its group's other weights (0 if the whole group is
    reserved): the weight the packed codes quantize."""
    n, k = W.shape
    g = spec.group_len(k)
    Wg, Mg = W.float().reshape(n, k // g, g), mask.reshape(n, k // g, g)
    keep = (~Mg).float()
    mean = (Wg * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)
    return torch.where(Mg, mean[..., None], Wg).reshape(n, k).to(W.dtype)


def reserved_values(W: Tensor, mask: Tensor) -> Tensor:
    """The reserved weights as the model will hold them: W rounded to the 16-bit storage dtype, in W.dtype."""
    return torch.where(mask, W.to(reserved_dtype(W)).to(W.dtype), W)


def to_csr(W: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rowptr int32 [N+1], cols int16 or int32 [nnz], values 16-bit [nnz]) of the reserved weights, rows in order
    and columns ascending within a row."""
    n, k = W.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: sorted by row, then column
    counts = torch.bincount(rows, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=W.device)
    rowptr[1:] = counts.cumsum(0)
    col_dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
    values = W[rows, cols].to(reserved_dtype(W))
    return rowptr.to(torch.int32), cols.to(col_dtype), values
