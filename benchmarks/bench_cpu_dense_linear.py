"""CPU dense_linear (the float layers of a quantized model: its LM head) against F.linear, measured in the same run.

A saliq model keeps its LM head in float; at decode (M <= cpp_backend.DENSE_MAX_ROWS) it runs saliq's GEMV
(csrc/cpu/dense_rows.h: rows of W split across the threads, four FMA chains a row, bf16 / fp16 widened in
registers), elsewhere F.linear. Caches are flushed before every timed call (the weight comes from DRAM, as in a
decode step, where the other layers' weights pass through the caches in between). Cases: the demo model's LM head
[49152, 576] and a 4096 x 4096 layer, fp32 / bf16 / fp16, M = 1 and 4. Both sides read the whole weight once per
call, so the copy bandwidth (measured first) gives each its share; the speedups are printed at the end and written
to benchmarks/results/.

    python -m pytest benchmarks/bench_cpu_dense_linear.py --benchmark-enable -q
    SALIQ_BENCH_THREADS=1 python -m pytest ...   # pin both sides to one thread
    SALIQ_BENCH_RESULTS=DIR python -m pytest ... # write the tables to DIR (default benchmarks/results)
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from common import (cpu_bench_header, cpu_bench_payload, cpu_bench_session, cpu_cache_flush_bytes, print_uncaptured,
                    write_bench_results)

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

SHAPES = [(49152, 576), (4096, 4096)]  # (N out_features, K in_features)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MS = [1, 4]
PROVIDERS = ["saliq", "linear"]
RESULTS: dict = {}
_cache: dict = {}
_flush: list = []


def flush_caches():
    # read, not written: a decode step leaves the caches full of other layers' weights, which are clean
    if not _flush:
        _flush.append(torch.ones(cpu_cache_flush_bytes() // 4))
    _flush[0].sum()


def weight(n, k, dtype):
    key = (n, k)
    if key not in _cache:
        _cache.clear()  # one shape's weights alive at a time
        W = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
        _cache[key] = {name: W.to(dt) for name, dt in DTYPES.items()}
    return _cache[key][dtype]


@pytest.fixture(scope="module", autouse=True)
def report(request):
    measured_threads, cases = yield from cpu_bench_session(RESULTS)
    if not cases:
        return
    lines = [cpu_bench_header("dense_linear", measured_threads, RESULTS["copy_gbs"]), "",
             "| N x K | dtype | M | saliq ms (% copy) | F.linear ms (% copy) | speedup |",
             "|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        for name, dt in DTYPES.items():
            for m in MS:
                s, f = cases.get(("saliq", n, k, name, m)), cases.get(("linear", n, k, name, m))
                if s is None or f is None:
                    continue
                pct = lambda sec: 100 * n * k * dt.itemsize / sec / 1e9 / RESULTS["copy_gbs"]  # noqa: E731
                lines.append(f"| {n} x {k} | {name} | {m} | {s * 1e3:.3f} ({pct(s):.0f}%) | {f * 1e3:.3f} "
                             f"({pct(f):.0f}%) | {f / s:.2f}x |")
    text = "\n".join(lines)
    print_uncaptured(request, text)
    write_bench_results("cpu_dense_linear", text, cpu_bench_payload(
        measured_threads, RESULTS["copy_gbs"],
        cases=[dict(zip(("provider", "N", "K", "dtype", "M"), key), seconds=v) for key, v in cases.items()]))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,k", SHAPES)
def test_dense_linear(benchmark, n, k, dtype, m, provider):
    W = weight(n, k, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(W.dtype)
    assert m <= cpp.DENSE_MAX_ROWS
    fn = (lambda: cpp.dense_linear(x, W)) if provider == "saliq" else (lambda: F.linear(x, W))
    benchmark.group = f"{n}x{k} {dtype} M={m}"
    benchmark.extra_info["bytes"] = n * k * W.element_size()
    y = benchmark.pedantic(fn, setup=flush_caches, rounds=20, iterations=1, warmup_rounds=2)
    expected = x.double() @ W.double().t()
    err = float((y.double() - expected).norm() / expected.norm())
    assert y.dtype == W.dtype and err <= {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}[dtype], f"{provider}: {err:.3g}"
    if benchmark.stats is not None:
        RESULTS[(provider, n, k, dtype, m)] = benchmark.stats.stats.min
