"""Clipping search: a start for the LWC logits that solves the weight-only objective per group.

The `wpt` stage minimises sum S (What - W)^2 over the clipping logits with AdamW; at the calibration budgets
of a CPU (a few dozen steps at lr 5e-3 from logit 4) the factors sigmoid(hi), sigmoid(lo) move by well under
1%. The objective splits into independent groups, so it can be solved directly: for every group, try
clipping factors on a grid and keep the pair with the smallest (saliency-weighted) squared error. With
S = None the search minimises the plain squared error (as AWQ's clipping search does, without activations).

Search order: one shared factor for both ends, then each end on its own with the other fixed (a coordinate
pass). The grid runs from sigmoid(init_logit) (the usual LWC start, kept when nothing beats it) down to
`lowest`. On a GPU one Triton kernel runs the whole search in a pass over W (saliq/kernels/clip_search.py);
elsewhere, and under `use_backend("ref")`, the eager torch ops below.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ref
from .spec import QuantSpec

DEFAULT_STEPS = 24
DEFAULT_LOWEST = 0.4
_CHUNK_ELEMENTS = 1 << 24  # rows per pass are chosen so the fp32 temporaries stay near 64 MiB each


def search_clipping(W: Tensor, spec: QuantSpec, S: Optional[Tensor] = None, init_logit: float = 4.0,
                    steps: int = DEFAULT_STEPS, lowest: float = DEFAULT_LOWEST) -> tuple[Tensor, Tensor]:
    """Logits (hi, lo) [N, G] (fp32, on W's device) minimising sum over each group of S (What - W)^2."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out_features, in_features]; got shape {tuple(W.shape)}")
    spec.group_len(W.shape[1])  # checks that the groups tile the rows
    if S is not None and S.shape != W.shape:
        raise ValueError(f"S has shape {tuple(S.shape)}; expected W's shape {tuple(W.shape)}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0.0 < lowest < 1.0:
        raise ValueError(f"lowest={lowest} must lie in (0, 1)")
    top = 1.0 / (1.0 + math.exp(-init_logit))
    grid = torch.linspace(top, min(lowest, top), steps).tolist()

    fused = _fused_search()
    if fused is not None and W.is_cuda:
        # one pass over W and S on the GPU (saliq/kernels/clip_search.py) instead of ~10 ops per candidate
        fmax, fmin = fused(W, S, spec.bits, spec.group_len(W.shape[1]), spec.symmetric, grid)
        return _to_logit(fmax, top, init_logit), _to_logit(fmin, top, init_logit)
    n, k = W.shape
    rows = max(1, _CHUNK_ELEMENTS // k)
    his, los = [], []
    for r0 in range(0, n, rows):
        Sc = None if S is None else S[r0 : r0 + rows]
        fmax, fmin = _search_rows(W[r0 : r0 + rows], Sc, spec, grid)
        his.append(fmax)
        los.append(fmin)
    fmax, fmin = torch.cat(his), torch.cat(los)
    return _to_logit(fmax, top, init_logit), _to_logit(fmin, top, init_logit)


def _fused_search():
    """The Triton search kernel, or None where Triton is missing or the eager reference is forced
    (`use_backend("ref")`: the eager calibration the benchmarks compare against)."""
    from . import backends

    if backends.forced() == "ref":
        return None
    try:
        from .kernels.clip_search import search_rows
    except ImportError:
        return None
    return search_rows


@torch.no_grad()
def _search_rows(W: Tensor, S: Optional[Tensor], spec: QuantSpec, grid: list[float]) -> tuple[Tensor, Tensor]:
    Wg = ref._grouped(W, spec.group_len(W.shape[1]))
    Sg = None if S is None else S.float().reshape(Wg.shape)
    wmax, wmin = Wg.amax(-1), Wg.amin(-1)
    qmax = (1 << spec.bits) - 1

    buf = torch.empty_like(Wg)  # one temporary for every candidate: no allocation (and page faults) per op

    def error(fmax: Tensor, fmin: Tensor) -> Tensor:
        s, z, *_ = ref.scale_zero(wmax, wmin, fmax, fmin, spec.bits, spec.symmetric)
        s, z = s[..., None], z[..., None]
        d = torch.div(Wg, s, out=buf).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(Wg).square_()
        return (d.mul_(Sg) if Sg is not None else d).sum(-1)

    best_max = torch.full_like(wmax, grid[0])
    best_min = best_max.clone()
    best = error(best_max, best_min)

    def consider(fmax: Tensor, fmin: Tensor):
        nonlocal best
        e = error(fmax, fmin)
        better = e < best
        best = torch.where(better, e, best)
        best_max.copy_(torch.where(better, fmax, best_max))
        best_min.copy_(torch.where(better, fmin, best_min))

    for f in grid[1:]:  # one shared factor
        c = torch.full_like(wmax, f)
        consider(c, c)
    if not spec.symmetric:  # then each end with the other fixed at its best
        for f in grid:
            consider(torch.full_like(wmax, f), best_min)
        for f in grid:
            consider(best_max, torch.full_like(wmax, f))
    return best_max, best_min


def _to_logit(f: Tensor, top: float, init_logit: float) -> Tensor:
    # the top of the grid maps back to init_logit exactly (logit(sigmoid(x)) is not exact in fp32)
    return torch.where(f >= top, torch.full_like(f, float(init_logit)), torch.logit(f.double()).float())
