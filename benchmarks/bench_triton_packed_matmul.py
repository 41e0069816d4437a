"""pytest-benchmark: packed linear (2/3/4-bit, group 64) at decode and prefill sizes, Triton against the eager
reference and fp16 F.linear. On the CPU (interpreter) the cases are small and only check correctness.

    pytest benchmarks/bench_triton_packed_matmul.py -o python_files='bench_*.py' --benchmark-enable
"""
import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, HAS_GPU, random_packed, rel_err, sync

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
from saliq import ref  # noqa: E402
from saliq.kernels import packed_matmul as pm  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008)] if HAS_GPU else [(37, 128)]
MS = [1, 16, 4096] if HAS_GPU else [1, 16, 33]
DTYPE = torch.float16 if HAS_GPU else torch.float32


@pytest.mark.parametrize("provider", ["triton", "ref", "fp16_linear"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_packed_linear(benchmark, n, k, bits, M, provider):
    p, W32 = random_packed(n, k, bits, 64, DTYPE, with_weight=True)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE)
    args = (p.qweight, p.qweight_hi, p.scales, p.zeros, bits, 64, k)
    if provider == "fp16_linear":
        W = W32.to(DTYPE)
        fn = lambda: F.linear(x, W)  # noqa: E731
    else:
        impl = pm.packed_matmul if provider == "triton" else ref.packed_matmul
        fn = lambda: impl(x, *args, None)  # noqa: E731

    def step():
        y = fn()
        sync()
        return y
    y = benchmark(step)
    # every provider against x W^T in fp64, W from the levels (not the reference against itself)
    assert rel_err(y, x.double() @ W32.double().t()) <= (1e-5 if DTYPE == torch.float32 else 2e-3)
