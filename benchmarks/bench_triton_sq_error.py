"""pytest-benchmark: saliency-weighted squared error with its fused gradient, Triton against the eager
reference. On the CPU (interpreter) the cases are small and only check correctness.

    pytest benchmarks/bench_triton_sq_error.py -o python_files='bench_*.py' --benchmark-enable
"""
import pytest
import torch

from common import DEVICE, HAS_GPU, rel_err, sync

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
from saliq import ref  # noqa: E402
from saliq.kernels import sq_error  # noqa: E402

SHAPES = [(4096, 11008), (1, 2048, 4096)] if HAS_GPU else [(37, 133)]


@pytest.mark.parametrize("provider", ["triton", "ref"])
@pytest.mark.parametrize("with_s", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sq_error(benchmark, shape, with_s, provider):
    A = torch.randn(shape, device=DEVICE)
    B = torch.randn(shape, device=DEVICE)
    S = torch.rand(shape, device=DEVICE) if with_s else None
    fn = sq_error.saliency_sq_error if provider == "triton" else ref.saliency_sq_error

    def step():
        out = fn(A, B, S, True)
        sync()
        return out
    loss, grad = benchmark(step)
    # both providers against the formula in fp64 (not the reference against itself)
    diff = A.double() - B.double()
    weight = S.double() if S is not None else 1.0
    assert abs(loss.item() - (weight * diff * diff).sum().item()) <= 1e-5 * abs(loss.item())
    assert rel_err(grad, 2 * weight * diff) <= 1e-6
