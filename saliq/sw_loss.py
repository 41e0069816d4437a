"""Sliced-Wasserstein distance between the block outputs of the quantized and the full-precision model: a
distribution-alignment term added to the block-output MSE (the seed paper's authors' follow-up).

Token vectors [n, D] of both outputs are projected on P random unit directions; in one dimension the
Wasserstein-2 distance between two equal-size empirical distributions is the mean squared difference of their
sorted values. The directions are drawn anew each step from a seeded generator (reproducible), so over the
steps the term covers the whole space."""
from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(y: Tensor, target: Tensor, projections: int, generator: torch.Generator) -> Tensor:
    """mean over P directions of the squared 1-D Wasserstein-2 distance between the token vectors of `y` and
    `target` ([..., D] each, same shape); differentiable in y."""
    if y.shape != target.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}, target {tuple(target.shape)}: they must match")
    if projections < 1:
        raise ValueError(f"projections={projections} must be >= 1")
    d = y.shape[-1]
    dirs = torch.randn(d, projections, generator=generator, dtype=torch.float32)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(y.device)
    py = torch.sort(y.reshape(-1, d).float() @ dirs, dim=0).values
    pt = torch.sort(target.reshape(-1, d).float() @ dirs, dim=0).values
    return ((py - pt) ** 2).mean()
