"""pytest-benchmark: dequantization of packed format v1 to W [N, K], Triton against the eager reference.
On the CPU (interpreter) the cases are small and only check correctness.

    pytest benchmarks/bench_triton_dequantize.py -o python_files='bench_*.py' --benchmark-enable
"""
import pytest
import torch

from common import HAS_GPU, random_packed, sync

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
from saliq import ref  # noqa: E402
from saliq.kernels import dequantize as dq  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008)] if HAS_GPU else [(37, 128)]


@pytest.mark.parametrize("provider", ["triton", "ref"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize(benchmark, n, k, bits, provider):
    p, W = random_packed(n, k, bits, 64, torch.float16, with_weight=True)
    args = (p.qweight, p.qweight_hi, p.scales, p.zeros, bits, 64, k)
    fn = dq.dequantize if provider == "triton" else ref.dequantize

    def step():
        W = fn(*args)
        sync()
        return W
    # both providers against the weight the levels encode (not the reference against itself)
    assert torch.equal(benchmark(step), W.to(torch.float16))
