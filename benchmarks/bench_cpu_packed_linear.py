"""CPU packed_linear (cpp backend) against fp32 and bf16 F.linear, measured in the same run.

Cases: 2- and 3-bit, group 64, M = 1 and 8, weights [N, K] = [4096, 4096] and [11008, 4096] (in 4096 ->
out 11008, the LLaMA-7B up/gate projection). saliq runs with fp32 activations and scales ("fp32", exact
fp32 arithmetic) and with bf16 activations and scales ("bf16"). The bytes floor of each case and the
machine's copy bandwidth (measured first) give effective GB/s and % of bandwidth; at the end the speedups
over F.linear are printed and written to benchmarks/results/.

    python -m pytest benchmarks/bench_cpu_packed_linear.py --benchmark-enable -q
    SALIQ_BENCH_THREADS=1 python -m pytest ...   # pin both sides to one thread
    SALIQ_BENCH_RESULTS=DIR python -m pytest ... # write the tables to DIR (default benchmarks/results)

On a machine shared with other multi-threaded jobs, run with OMP_WAIT_POLICY=passive: with libgomp's default
spin-waiting, every parallel region (saliq's and F.linear's alike) can stall for a scheduler time slice.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from common import (cpu_bench_header, cpu_bench_payload, cpu_bench_session, print_uncaptured,
                    write_bench_results)
import torch.nn.functional as F

from saliq import packing
from saliq.spec import QuantSpec

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

SHAPES = [(4096, 4096), (11008, 4096)]  # (N out_features, K in_features)
BITS = [2, 3]
MS = [1, 8]
GROUP = 64
PROVIDERS = ["saliq_fp32", "saliq_bf16", "linear_fp32", "linear_bf16"]
RESULTS: dict = {}
# The ratios use the best round of each case: on a shared machine, preemption only ever adds time. Both sides run
# on SALIQ_BENCH_THREADS threads (common.cpu_bench_session; unset: torch's default).
_cache: dict = {}


def weights(n, k, bits):
    key = (n, k, bits)
    if key not in _cache:
        g = torch.Generator().manual_seed(n + k + bits)
        spec = QuantSpec(bits=bits, group_size=GROUP)
        q = torch.randint(0, 1 << bits, (n, k), generator=g)
        scales = torch.rand(n, k // GROUP, generator=g) * 0.01 + 0.005
        zeros = torch.randint(0, 1 << bits, (n, k // GROUP), generator=g).float()
        packed = {dt: packing.pack_weight(q, scales, zeros, spec, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        # The weight the levels encode, computed here: the dense baselines multiply by it (their time does not
        # depend on the values), and every provider's output is checked against x W^T in fp64.
        dense = {}
        for dt in (torch.float32, torch.bfloat16):
            s = scales.to(dt).float().repeat_interleave(GROUP, dim=1)
            dense[dt] = (q.float() - zeros.repeat_interleave(GROUP, dim=1)) * s  # fp32, from the stored scales
        _cache.clear()  # keep one shape's weights alive at a time
        _cache[key] = (packed, dense)
    return _cache[key]


def bytes_moved(provider, n, k, bits, m):
    if provider.startswith("linear"):
        return n * k * (4 if provider.endswith("fp32") else 2)
    scale_bytes = 4 if provider.endswith("fp32") else 2
    return n * k * bits // 8 + (n * k // GROUP) * (scale_bytes + 2)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    measured_threads, cases = yield from cpu_bench_session(RESULTS)
    if not cases:
        return
    lines = [cpu_bench_header("packed_linear", measured_threads, RESULTS["copy_gbs"]), "",
             "| N x K | bits | M | saliq fp32 ms | saliq bf16 ms | F.linear fp32 ms | F.linear bf16 ms | "
             "fp32 speedup | bf16 speedup | saliq fp32 GB/s (% copy) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        for bits in BITS:
            for m in MS:
                t = {p: cases.get((p, n, k, bits, m)) for p in PROVIDERS}
                if any(v is None for v in t.values()):
                    continue
                gbs = bytes_moved("saliq_fp32", n, k, bits, m) / t["saliq_fp32"] / 1e9
                lines.append(
                    f"| {n} x {k} | {bits} | {m} | {t['saliq_fp32'] * 1e3:.3f} | {t['saliq_bf16'] * 1e3:.3f} | "
                    f"{t['linear_fp32'] * 1e3:.3f} | {t['linear_bf16'] * 1e3:.3f} | "
                    f"{t['linear_fp32'] / t['saliq_fp32']:.1f}x | {t['linear_bf16'] / t['saliq_bf16']:.1f}x | "
                    f"{gbs:.1f} ({100 * gbs / RESULTS['copy_gbs']:.0f}%) |")
    text = "\n".join(lines)
    print_uncaptured(request, text)
    write_bench_results("cpu_packed_linear", text, cpu_bench_payload(
        measured_threads, RESULTS["copy_gbs"],
        cases=[dict(zip(("provider", "N", "K", "bits", "M"), key), seconds=v) for key, v in cases.items()]))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_packed_linear(benchmark, n, k, bits, m, provider):
    packed, dense = weights(n, k, bits)
    dtype = torch.float32 if provider.endswith("fp32") else torch.bfloat16
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    if provider.startswith("saliq"):
        p = packed[dtype]
        args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, GROUP, k, None)
        fn = lambda: cpp.packed_matmul(*args)  # noqa: E731
    else:
        if bits != BITS[0]:  # the dense baseline does not depend on bits: measure it once per shape and M
            RESULTS[(provider, n, k, bits, m)] = RESULTS.get((provider, n, k, BITS[0], m))
            pytest.skip("dense baseline measured with bits=2")
        W = dense[dtype].to(dtype)
        fn = lambda: F.linear(x, W)  # noqa: E731
    benchmark.group = f"{n}x{k} M={m} bits={bits}"
    benchmark.extra_info["bytes"] = bytes_moved(provider, n, k, bits, m)
    y = benchmark.pedantic(fn, rounds=30 if m == 1 else 10, iterations=1, warmup_rounds=3)
    W64 = dense[dtype]
    expected = torch.cat([x.double() @ W64[i : i + 1024].double().t() for i in range(0, n, 1024)], dim=1)
    err = float((y.double() - expected).norm() / expected.norm())
    assert y.dtype == dtype and err <= (1e-5 if dtype == torch.float32 else 1e-2), f"{provider}: error {err:.3g}"
    if benchmark.stats is not None:
        RESULTS[(provider, n, k, bits, m)] = benchmark.stats.stats.min
