"""Saliency-weighted squared error sum S (A - B)^2 and the plain MSE of block outputs, with their gradient.

Computes saliq.ref.saliency_sq_error (and mse = sum (A - B)^2 / numel). The inputs are flattened; each
program owns BLOCK consecutive elements, writes the gradient 2 S (A - B) for them in the same pass (as
Liger's losses do: the backward is then a scale of a saved tensor, with no second read of A, B, S) and one
fp32 partial sum. The partials are summed by one program in a fixed order: a deterministic two-stage
reduction with no atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import autotune
from .common import alloc, is_interpreter, sum_partials


@triton.jit
def _sq_error_kernel(a_ptr, b_ptr, s_ptr, grad_ptr, partial_ptr, numel, grad_scale,
                     HAS_S: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    diff = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    weighted = diff
    if HAS_S:
        weighted = diff * tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(weighted * diff, axis=0))
    if NEED_GRAD:
        tl.store(grad_ptr + offs, (grad_scale * weighted).to(grad_ptr.dtype.element_ty), mask=mask)


def _candidates() -> list[dict]:
    if is_interpreter():
        return [dict(BLOCK=8192, num_warps=4)]
    return [dict(BLOCK=4096, num_warps=8), dict(BLOCK=2048, num_warps=4), dict(BLOCK=8192, num_warps=8),
            dict(BLOCK=1024, num_warps=4)]


def _launch(A, B, S, need_grad: bool, scale: float):
    A, B = A.contiguous(), B.contiguous()
    S_ = A if S is None else S.contiguous()  # placeholder, never read without HAS_S
    numel = A.numel()
    grad = alloc(A.shape, A.dtype, A.device) if need_grad else None

    def run(cfg):
        grid = (max(1, triton.cdiv(numel, cfg["BLOCK"])),)
        partials = torch.empty(grid[0], dtype=torch.float32, device=A.device)
        _sq_error_kernel[grid](A, B, S_, A if grad is None else grad, partials, numel, 2.0 * scale,
                               HAS_S=S is not None, NEED_GRAD=need_grad, BLOCK=cfg["BLOCK"],
                               num_warps=cfg["num_warps"])
        return partials

    key = (str(A.dtype).replace("torch.", ""), S is not None, need_grad, autotune.m_bucket(numel // 4096))
    cfg = autotune.choose("sq_error", key, _candidates(), run, A.device)
    return sum_partials(run(cfg), scale), grad


def saliency_sq_error(A: torch.Tensor, B: torch.Tensor, S: Optional[torch.Tensor], need_grad: bool):
    """Triton saliq.ref.saliency_sq_error: (sum S (A - B)^2 fp32 scalar, 2 S (A - B) in A.dtype or None)."""
    return _launch(A, B, S, need_grad, 1.0)


def mse(A: torch.Tensor, B: torch.Tensor, need_grad: bool):
    """Mean squared error: (sum (A - B)^2 / numel, its gradient 2 (A - B) / numel in A.dtype or None),
    the 1 / numel folded into the same pass."""
    return _launch(A, B, None, need_grad, 1.0 / max(A.numel(), 1))
