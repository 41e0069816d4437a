"""pytest-benchmark: LWC fake quantization forward + backward (with the saliency term), Triton against the
eager ApiQ-style composite. On the CPU (interpreter) the cases are small and only check correctness.

    pytest benchmarks/bench_triton_fake_quant.py -o python_files='bench_*.py' --benchmark-enable
"""
import pytest
import torch

from common import HAS_GPU, apiq_fake_quant, lwc_inputs, rel_err, sync

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
from saliq import ref  # noqa: E402
from saliq.kernels import fake_quant as fq  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096)] if HAS_GPU else [(37, 256)]
DTYPE = torch.float16 if HAS_GPU else torch.float32


def _triton(W, hi, lo, S, bits, g):
    def step():
        what, reg = fq.fake_quant_lwc_fwd(W, hi, lo, S, None, bits, g, False)
        out = fq.fake_quant_lwc_bwd(what, reg.new_tensor(0.1), W, hi, lo, S, None, bits, g, False, False)
        sync()
        return what, out
    return step


def _eager(W, hi, lo, S, bits, g):
    hi_, lo_ = hi.clone().requires_grad_(), lo.clone().requires_grad_()

    def step():
        hi_.grad = lo_.grad = None  # each round's own gradients, not a sum over rounds
        what, reg = apiq_fake_quant(W, hi_, lo_, bits, g, S)
        torch.autograd.backward([what, reg], [what.detach(), torch.tensor(0.1, device=W.device)])
        sync()
        return what, (None, hi_.grad, lo_.grad)
    return step


@pytest.mark.parametrize("provider", ["triton", "eager"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fake_quant_fwd_bwd(benchmark, n, k, bits, provider):
    W, hi, lo, S = lwc_inputs(n, k, 64, DTYPE)
    step = (_triton if provider == "triton" else _eager)(W, hi, lo, S, bits, 64)
    what, grads = benchmark(step)
    dhi, dlo = grads[1], grads[2]
    tol = 1e-5 if DTYPE == torch.float32 else 2e-3
    what_r, _ = ref.fake_quant_lwc_fwd(W, hi, lo, S, None, bits, 64, False)
    assert rel_err(what, what_r) <= tol
    # the backward both providers time: the logits' gradients for grad(What) = What and grad(reg) = 0.1
    _, dhi_r, dlo_r, _ = ref.fake_quant_lwc_bwd(what.to(W.dtype), torch.tensor(0.1, device=W.device), W, hi, lo, S,
                                               None, bits, 64, False, False)
    assert rel_err(dhi, dhi_r) <= tol and rel_err(dlo, dlo_r) <= tol
    assert dhi_r.abs().sum() > 0 and dlo_r.abs().sum() > 0
