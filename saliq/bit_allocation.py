"""Saliency-driven bit allocation (CLAQ-style adaptive precision, per linear): spend an average bit budget unevenly.

Every block linear starts at the base width; upgrades to the next width go, in order of benefit per extra bit,
to the linears where they remove the most saliency-weighted rounding error, until the average code width reaches
the budget. The error of a width is that of min-max rounding, sum S (RTN_b(W) - W)^2 with the raw Fisher S: the
diagonal second-order estimate of the loss increase, comparable across linears because every S is a gradient of
the same loss (without S: the plain squared error). Mixed widths per linear need no new kernel: every QuantLinear
has its own spec, and the checkpoint records each module's width (docs/FORMAT.md)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ref
from .spec import QuantSpec


def rounding_error(W: Tensor, S: Optional[Tensor], spec: QuantSpec) -> float:
    """sum S (RTN(W) - W)^2 at `spec` (fp64 sum)."""
    err = (ref.rtn_dequantized(W, spec.bits, spec.group_size, spec.symmetric) - W.float()) ** 2
    if S is not None:
        err = err * S.float()
    return float(err.double().sum())


def allocate(weights: dict[str, Tensor], saliency: Optional[dict[str, Tensor]], spec: QuantSpec,
             budget: float, widths: tuple[int, ...] | None = None) -> dict[str, int]:
    """{name: bits} for the linears `weights` with an average code width (weighted by size) of at most `budget`.

    widths: the allowed widths, ascending, starting at spec.bits (default: spec.bits and spec.bits + 1, up to 4).
    Upgrades are greedy by error removed per extra bit, one width step at a time."""
    widths = tuple(widths or [b for b in (spec.bits, spec.bits + 1) if b <= 4])
    if list(widths) != sorted(set(widths)) or widths[0] != spec.bits or not set(widths) <= {2, 3, 4}:
        raise ValueError(f"widths={widths} must be ascending, start at bits={spec.bits} and lie in {{2, 3, 4}}")
    if not widths[0] <= budget <= widths[-1]:
        raise ValueError(f"bit_budget={budget} must lie in [{widths[0]}, {widths[-1]}] (the allowed widths)")
    if not weights:
        return {}
    bits = {name: widths[0] for name in weights}
    size = {name: W.numel() for name, W in weights.items()}
    total = sum(size.values())
    spent = sum(bits[n] * size[n] for n in weights)
    errors = {}

    def err(name, b):
        if (name, b) not in errors:
            S = None if saliency is None else saliency[name]
            errors[name, b] = rounding_error(weights[name], S, QuantSpec(b, spec.group_size, spec.symmetric))
        return errors[name, b]

    while True:
        best, best_gain = None, 0.0
        for name in weights:
            i = widths.index(bits[name])
            if i + 1 == len(widths):
                continue
            step = widths[i + 1] - widths[i]
            if spent + step * size[name] > budget * total + 1e-9:
                continue
            gain = (err(name, widths[i]) - err(name, widths[i + 1])) / (step * size[name])
            if best is None or gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return bits
        i = widths.index(bits[best])
        spent += (widths[i + 1] - widths[i]) * size[best]
        bits[best] = widths[i + 1]


def average_bits(bits: dict[str, int], weights: dict[str, Tensor]) -> float:
    total = sum(W.numel() for W in weights.values())
    return sum(bits[n] * weights[n].numel() for n in weights) / total
