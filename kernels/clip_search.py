"""The clipping search of saliq/clip_search.py in one pass over W (and S): saliq.clip_search._search_rows.

The eager search evaluates 1 + (steps - 1) + 2 steps candidate pairs of clipping factors, each with about ten
full-size tensor ops: some 500 passes over W per linear. Here a program owns BLOCK_R whole group rows (as the
fake-quantization kernels), loads them once, and runs the same candidates in the same order on the tile in
registers: per candidate the group's What (fake_quant._group_quant, the reference's arithmetic), its
(saliency-weighted) squared error summed over the group, and the strict `<` that keeps the earlier candidate
on a tie. The group sums are reductions in another order than torch's, so an error can differ from the
eager one in its last bits and a near-tie can resolve the other way; the chosen factors are otherwise the
same (tests/kernels/test_triton_clip_search.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import is_interpreter, next_pow2
from .fake_quant import EXACT_OPTIONS, _group_quant, _group_tile, _int_div_args, tiles_are_even


@triton.jit
def _group_error(w, sal, mask, fmax, fmin, QMAX: tl.constexpr, HALF: tl.constexpr, INV_QMAX: tl.constexpr,
                 INV_HALF: tl.constexpr, TORCH_RECIP: tl.constexpr, FMA_DIV: tl.constexpr,
                 SYMMETRIC: tl.constexpr, HAS_S: tl.constexpr):
    _, _, _, _, _, _, _, _, _, _, _, _, what = _group_quant(w, mask, fmax, fmin, QMAX, HALF, INV_QMAX, INV_HALF,
                                                            TORCH_RECIP, FMA_DIV, SYMMETRIC)
    d = what - w
    d = d * d
    if HAS_S:
        d = d * sal
    return tl.sum(tl.where(mask, d, 0.0), axis=1)


@triton.jit
def _clip_search_kernel(w_ptr, s_ptr, grid_ptr, best_max_ptr, best_min_ptr, R, g, STEPS: tl.constexpr,
                        QMAX: tl.constexpr, HALF: tl.constexpr, INV_QMAX: tl.constexpr, INV_HALF: tl.constexpr,
                        TORCH_RECIP: tl.constexpr, FMA_DIV: tl.constexpr, SYMMETRIC: tl.constexpr,
                        HAS_S: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok, mask, offs = _group_tile(pid, R, g, BLOCK_R, BLOCK_G, EVEN)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sal = w
    if HAS_S:
        sal = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    top = tl.load(grid_ptr)
    best_max = tl.full((BLOCK_R,), 0.0, tl.float32) + top
    best_min = best_max
    best = _group_error(w, sal, mask, best_max, best_min, QMAX, HALF, INV_QMAX, INV_HALF, TORCH_RECIP,
                        FMA_DIV, SYMMETRIC, HAS_S)
    # one shared factor for both ends
    for i in range(1, STEPS):
        f = tl.full((BLOCK_R,), 0.0, tl.float32) + tl.load(grid_ptr + i)
        e = _group_error(w, sal, mask, f, f, QMAX, HALF, INV_QMAX, INV_HALF, TORCH_RECIP, FMA_DIV, SYMMETRIC,
                         HAS_S)
        better = e < best
        best = tl.where(better, e, best)
        best_max = tl.where(better, f, best_max)
        best_min = tl.where(better, f, best_min)
    if not SYMMETRIC:
        # then each end on its own, the other fixed at its best so far
        for i in range(0, STEPS):
            f = tl.full((BLOCK_R,), 0.0, tl.float32) + tl.load(grid_ptr + i)
            e = _group_error(w, sal, mask, f, best_min, QMAX, HALF, INV_QMAX, INV_HALF, TORCH_RECIP, FMA_DIV,
                             SYMMETRIC, HAS_S)
            better = e < best
            best = tl.where(better, e, best)
            best_max = tl.where(better, f, best_max)
        for i in range(0, STEPS):
            f = tl.full((BLOCK_R,), 0.0, tl.float32) + tl.load(grid_ptr + i)
            e = _group_error(w, sal, mask, best_max, f, QMAX, HALF, INV_QMAX, INV_HALF, TORCH_RECIP, FMA_DIV,
                             SYMMETRIC, HAS_S)
            better = e < best
            best = tl.where(better, e, best)
            best_min = tl.where(better, f, best_min)
    tl.store(best_max_ptr + rows, best_max, mask=row_ok)
    tl.store(best_min_ptr + rows, best_min, mask=row_ok)


def search_rows(W: torch.Tensor, S: Optional[torch.Tensor], bits: int, group_len: int, symmetric: bool,
                grid: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen factors (fmax, fmin) [N, G] fp32 of W [N, K] for the candidate `grid` (first entry: the
    start), as saliq.clip_search._search_rows."""
    W = W.contiguous()
    n, k = W.shape
    R = n * (k // group_len)
    block_g = next_pow2(group_len)
    block_r = max(1, (16384 if is_interpreter() else 2048) // block_g)  # registers: ~2K elements per program
    grid_t = torch.tensor(grid, dtype=torch.float32, device=W.device)
    best_max = torch.empty(R, dtype=torch.float32, device=W.device)
    best_min = torch.empty(R, dtype=torch.float32, device=W.device)
    S_ = W if S is None else S.contiguous()  # placeholder: never read without S
    _clip_search_kernel[(triton.cdiv(R, block_r),)](
        W, S_, grid_t, best_max, best_min, R, group_len, STEPS=len(grid), **_int_div_args(bits, W.device),
        SYMMETRIC=symmetric, HAS_S=S is not None, BLOCK_R=block_r, BLOCK_G=block_g,
        EVEN=tiles_are_even(R, group_len, block_r, block_g), num_warps=4, **EXACT_OPTIONS)
    G = k // group_len
    return best_max.view(n, G), best_min.view(n, G)
