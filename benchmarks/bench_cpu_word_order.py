"""What a 3-bit layer's conversion into the CPU word order costs when it loads: the bit re-pack of both planes
(saliq/word_order.py `_repack3`: saliq._C.repack3 on the CPU, the torch loop elsewhere) and the whole conversion a
QuantLinear runs (`to_cpu_order`: re-pack, then the words put in band order). Each provider's words are checked
against the torch loop's before it is timed.

    python -m pytest benchmarks/bench_cpu_word_order.py --benchmark-enable -q
"""
from __future__ import annotations

import pytest
import torch

from saliq import packing, word_order
from saliq.spec import QuantSpec

SHAPES = [(4096, 4096), (11008, 4096)]  # (N out_features, K in_features)
PROVIDERS = ["repack_cpp", "repack_torch", "to_cpu_order"]


def planes(n, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 8, (n, k), generator=g)
    spec = QuantSpec(bits=3, group_size=64)
    p = packing.pack_weight(q, torch.rand(n, k // 64, generator=g) + 0.01, torch.zeros(n, k // 64), spec)
    return p.qweight, p.qweight_hi


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_3bit_conversion(benchmark, n, k, provider):
    lo, hi = planes(n, k)
    want = word_order._repack3_torch(lo, hi, into_cpu_layout=True)
    if provider == "repack_cpp":
        from saliq import _C

        fn = lambda: _C.repack3(lo, hi, True)  # noqa: E731
        got = fn()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    elif provider == "repack_torch":
        fn = lambda: word_order._repack3_torch(lo, hi, True)  # noqa: E731
    else:
        fn = lambda: word_order.to_cpu_order(lo, hi, 3)  # noqa: E731
        flat_lo, flat_hi = fn()
        assert torch.equal(word_order.plane_to_v1(flat_lo, 2, k, n), want[0])
        assert torch.equal(word_order.plane_to_v1(flat_hi, 1, k, n), want[1])
    benchmark.extra_info.update(N=n, K=k, provider=provider)
    benchmark(fn)
