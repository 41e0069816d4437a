"""CPU LWC fake quantization forward + backward: saliq's fused cpp kernels against the eager composite.

The composite is the ApiQ / OmniQuant quantizer written with round_ste and differentiated by autograd
(W frozen, gradients to the clipping logits hi, lo), plus the saliency penalty sum S (What - W)^2 when the
case has one. saliq runs saliq.ops.fake_quant_lwc on the cpp backend (one pass forward, one pass backward,
penalty fused). Speedups are printed at the end and written to benchmarks/results/.

    python -m pytest benchmarks/bench_cpu_fake_quant.py --benchmark-enable -q
    SALIQ_BENCH_THREADS=1 python -m pytest ...   # pin both sides to one thread
    SALIQ_BENCH_RESULTS=DIR python -m pytest ... # write the tables to DIR (default benchmarks/results)

On a machine shared with other multi-threaded jobs, run with OMP_WAIT_POLICY=passive: with libgomp's default
spin-waiting, every parallel region (saliq's and F.linear's alike) can stall for a scheduler time slice.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
from common import cpu_bench_threads, print_uncaptured, write_bench_results

from saliq import backends, ops, ref
from saliq.spec import QuantSpec

from saliq import cpp_backend as cpp  # noqa: E402,F401  (saliq._C not built: a collection error, not a skip)

CASES = [  # (N, K, bits, group, saliency)
    (4096, 4096, 2, 64, False),
    (4096, 4096, 2, 64, True),
    (1536, 576, 3, 64, False),
]
RESULTS: dict = {}
EXPECTED: dict = {}
# The ratios use the best round of each case: on a shared machine, preemption only ever adds time. Both sides run
# on SALIQ_BENCH_THREADS threads (common.cpu_bench_threads; unset: torch's default).


def round_ste(x):
    return (x.round() - x).detach() + x


def composite(W, hi, lo, bits, group, S):
    n, k = W.shape
    qmax = (1 << bits) - 1
    Wg = W.reshape(n, k // group, group)
    xmax = torch.sigmoid(hi)[..., None] * Wg.amax(-1, keepdim=True)
    xmin = torch.sigmoid(lo)[..., None] * Wg.amin(-1, keepdim=True)
    s = ((xmax - xmin) / qmax).clamp(1e-5, 1e4)
    z = (-xmin / s).clamp(-1e4, 1e4).round()
    q = (round_ste(Wg / s) + z).clamp(0, qmax)
    what = ((q - z) * s).reshape(n, k)
    reg = (S * (what - W) ** 2).sum() if S is not None else None
    return what, reg


def inputs(n, k, group, saliency):
    g = torch.Generator().manual_seed(n + k)
    W = torch.randn(n, k, generator=g) * 0.02
    hi = torch.full((n, k // group), 4.0) + torch.randn(n, k // group, generator=g) * 0.1
    lo = hi.clone()
    S = torch.rand(n, k, generator=g) if saliency else None
    grad = torch.randn(n, k, generator=g)
    return W, hi, lo, S, grad


@pytest.fixture(scope="module", autouse=True)
def report(request):
    with cpu_bench_threads() as ran_on:
        yield
    measured_threads = ran_on[0]
    lines = [f"CPU fake_quant_lwc forward+backward, {datetime.date.today()}, {measured_threads} threads "
             f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})", "",
             "| N x K | bits | group | saliency | eager composite ms | saliq cpp ms | speedup |", "|---|---|---|---|---|---|---|"]
    rows = []
    for case in CASES:
        e, s = RESULTS.get(("eager",) + case), RESULTS.get(("saliq",) + case)
        if e is None or s is None:
            continue
        n, k, bits, group, sal = case
        lines.append(f"| {n} x {k} | {bits} | {group} | {'yes' if sal else 'no'} | {e * 1e3:.1f} | {s * 1e3:.1f} | "
                     f"{e / s:.1f}x |")
        rows.append(dict(N=n, K=k, bits=bits, group=group, saliency=sal, eager_s=e, saliq_s=s))
    if not rows:
        return
    text = "\n".join(lines)
    print_uncaptured(request, text)
    write_bench_results("cpu_fake_quant", text,
                        {"date": str(datetime.date.today()), "threads": measured_threads, "cases": rows})


@pytest.mark.parametrize("provider", ["eager", "saliq"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-w{c[2]}g{c[3]}{'-S' if c[4] else ''}")
def test_fake_quant_fwd_bwd(benchmark, case, provider):
    n, k, bits, group, saliency = case
    W, hi0, lo0, S, grad = inputs(n, k, group, saliency)
    spec = QuantSpec(bits=bits, group_size=group)

    def run():
        hi, lo = hi0.clone().requires_grad_(True), lo0.clone().requires_grad_(True)
        if provider == "eager":
            what, reg = composite(W, hi, lo, bits, group, S)
        else:
            with backends.use_backend("cpp"):
                out = ops.fake_quant_lwc(W, hi, lo, spec, S=S)
            what, reg = out if S is not None else (out, None)
        loss = (what * grad).sum() + (0.1 * reg if reg is not None else 0.0)
        loss.backward()
        return what.detach(), hi.grad, lo.grad

    benchmark.group = f"fake_quant {n}x{k} w{bits}g{group}{' +S' if saliency else ''}"
    what, dhi, dlo = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    # what both sides time, forward and backward, against the reference (computed once per case)
    if case not in EXPECTED:
        EXPECTED.clear()
        what_r, _ = ref.fake_quant_lwc_fwd(W, hi0, lo0, S, None, bits, group, False)
        EXPECTED[case] = (what_r, *ref.fake_quant_lwc_bwd(grad, torch.tensor(0.1), W, hi0, lo0, S, None, bits, group,
                                                          False, False)[1:3])
    what_r, dhi_r, dlo_r = EXPECTED[case]
    for name, got, want in (("What", what, what_r), ("dhi", dhi, dhi_r), ("dlo", dlo, dlo_r)):
        err = float((got.double() - want.double()).norm() / want.double().norm())
        assert err <= 1e-5, f"{provider} {name}: relative error {err:.3g}"
    if benchmark.stats is not None:
        RESULTS[(provider,) + case] = benchmark.stats.stats.min
