"""Helpers shared by the Triton kernels: interpreter detection, output allocation, and the second stage of
every deterministic reduction (a fixed-order sum of per-program partials in one program).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def is_interpreter() -> bool:
    """True when Triton runs on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def poison_outputs() -> bool:
    """SALIQ_POISON_OUTPUTS=1 fills every freshly allocated float output with NaN, so tests catch an element a
    kernel forgot to write."""
    return os.environ.get("SALIQ_POISON_OUTPUTS") == "1"


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled when outputs are poisoned (tests)."""
    if poison_outputs() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _sum_partials_kernel(p_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # one program, a fixed chunk order and a fixed tree inside tl.sum: the same bits on every run
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(p_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


def sum_partials(partials: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Deterministic sum of a 1-D fp32 tensor of partial sums -> fp32 scalar (times `scale`)."""
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    block = min(1024, next_pow2(partials.numel()))
    _sum_partials_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK=block)
    return out
