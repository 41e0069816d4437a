"""Rounding ties: every backend's fake quantization rounds half to even, as torch.round does (OPS.md).

Random inputs never land on a tie, so these inputs are built to: clipping logits 0 (sigmoid exactly 0.5) and
group ranges chosen so that every scale is exactly 1. Then W / s = W, and weights at k + 0.5 are ties of the
element rounding; groups whose minimum is -(2k + 1) put the zero point -xmin / s = k + 0.5 on a tie too;
negative weights give negative ties. The expected levels come from Python's round() (half to even), not from
saliq. A kernel that rounds ties up, or away from zero (roundf), fails here.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from composite import omniquant_fake_quant
from saliq import backends, ref

GPU = torch.cuda.is_available()


def _half_even(x: float) -> float:
    return float(round(x))  # Python rounds ties to even


def _half_up(x: float) -> float:
    return float(math.floor(x + 0.5))


def _half_away(x: float) -> float:
    return math.copysign(math.floor(abs(x) + 0.5), x)


def _recipes(bits: int, symmetric: bool) -> list[list[float]]:
    """Groups (as value lists, extremes first) whose scale is exactly 1 when both clipping factors are 0.5."""
    if symmetric:  # s = max(|xmax|, |xmin|) / h, so the larger extreme is 2h
        h = (1 << (bits - 1)) - 1
        spans = [(-2 * h, 2 * h), (-1, 2 * h), (-2 * h, 1)]
    else:  # s = (xmax - xmin) / Q, so the range is 2Q; -xmin / s = -wmin / 2
        q = (1 << bits) - 1
        spans = [(0, 2 * q), (-2 * q, 0)]  # zero point 0 and Q: ties of positive, then negative weights
        spans += [(-(2 * k + 1), 2 * q - (2 * k + 1)) for k in (0, 1, 2)]  # zero point k + 0.5: a tie itself
    return [[float(lo), float(hi)] + [j + 0.5 for j in range(lo, hi)] for lo, hi in spans]


def tie_inputs(bits: int, group_size: int, k: int, symmetric: bool, n: int = 7, seed: int = 0):
    """W [n, k] fp32 made of tie groups, logits hi = lo = 0 [n, G]."""
    g = k if group_size == -1 else group_size
    groups = k // g
    rng = random.Random(seed)
    recipes = _recipes(bits, symmetric)
    rows = []
    for r in range(n):
        row = []
        for j in range(groups):
            values = recipes[(r * groups + j) % len(recipes)]
            assert len(values) <= g
            body = [values[2 + i % (len(values) - 2)] for i in range(g - 2)]
            group = values[:2] + body
            rng.shuffle(group)  # extremes and ties anywhere in the group, not on fixed lanes
            row += group
        rows.append(row)
    W = torch.tensor(rows, dtype=torch.float32)
    zeros = torch.zeros(n, groups)
    return W, zeros, zeros.clone()


def expected_what(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, rounding=_half_even):
    """What of docs/ARCHITECTURE.md 1.1 for tie inputs (s = 1), element by element in Python floats."""
    n, k = W.shape
    g = k if group_size == -1 else group_size
    qmax = (1 << bits) - 1
    out = []
    for row in W.tolist():
        out_row = []
        for j in range(0, k, g):
            group = row[j : j + g]
            xmin = 0.5 * min(group)
            z = float((1 << (bits - 1)) - 1) if symmetric else rounding(-xmin)
            out_row += [min(max(rounding(w) + z, 0.0), qmax) - z for w in group]
        out.append(out_row)
    return torch.tensor(out, dtype=torch.float32)


CASES = [(bits, group_size, k, symmetric) for bits in (2, 3, 4) for symmetric in (False, True)
         for group_size, k in ((32, 64), (-1, 100))]


def _case_id(c):
    return f"w{c[0]}-g{c[1]}-k{c[2]}-{'sym' if c[3] else 'asym'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_the_inputs_are_ties_and_tell_the_rounding_modes_apart(case):
    bits, group_size, k, symmetric = case
    W, hi, lo = tie_inputs(bits, group_size, k, symmetric)
    _, s, z = ref.lwc_quantize(W, hi, lo, bits, group_size, symmetric)
    assert torch.all(s == 1.0), "every scale must be exactly 1"
    assert (W.frac().abs() == 0.5).float().mean() > 0.8
    even = expected_what(W, bits, group_size, symmetric)
    for other in (_half_up, _half_away):
        assert not torch.equal(even, expected_what(W, bits, group_size, symmetric, other)), other.__name__
    if not symmetric:  # some zero points are ties, and they land on even values
        zp = -0.5 * W.reshape(W.shape[0], -1, k if group_size == -1 else group_size).amin(-1)
        assert (zp.frac() == 0.5).any() and torch.equal(z, zp.round())


def test_torch_round_is_half_to_even_on_the_values_used():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert torch.round(x).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]
    assert torch.round(x).tolist() == [_half_even(v) for v in x.tolist()]


def test_the_reference_rounds_ties_to_even_by_hand():
    """The case of the issue that found the gap: W = [0, .5, 1.5, 2.5, 3] with s = 1 gives [0, 0, 2, 2, 3]."""
    W = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0] + [1.0] * 27])
    inf = torch.full((1, 1), float("inf"))  # no clipping: s = (3 - 0) / 3 = 1
    what, _ = ref.fake_quant_lwc_fwd(W, inf, inf, None, None, 2, 32, False)
    assert what[0, :5].tolist() == [0.0, 0.0, 2.0, 2.0, 3.0]
    # zero-point tie: W in [-1, 5], factors 0.5, -xmin / s = 0.5 -> z = 0 (half up would give 1)
    W = torch.tensor([[-1.0, 5.0, -0.5, 0.5, 1.5] + [0.0] * 27])
    zero = torch.zeros(1, 1)
    q, s, z = ref.lwc_quantize(W, zero, zero, 2, 32, False)
    assert s.item() == 1.0 and z.item() == 0.0
    assert q[0, :5].tolist() == [0, 3, 0, 0, 2]


# ---------------------------------------------------------------- every backend
def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and GPU) else "cpu"


BACKENDS = ["ref", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def impl(request, monkeypatch):
    """The backend's fake-quant forward and backward; a backend this machine should run must be present."""
    name = request.param
    device = _device(name)
    monkeypatch.setenv("SALIQ_POISON_OUTPUTS", "1")  # NaN-filled outputs: an unwritten element fails
    monkeypatch.setenv("SALIQ_AUTOTUNE", "0")
    for op in ("fake_quant_lwc_fwd", "fake_quant_lwc_bwd"):
        assert name in backends.available(op, device), (
            f"backend {name} cannot run {op} here: {backends.load_optional_backends()}")
    with backends.use_backend(name):
        fwd = backends.resolve("fake_quant_lwc_fwd", device)
        bwd = backends.resolve("fake_quant_lwc_bwd", device)
    return name, device, fwd, bwd


@pytest.mark.parametrize("impl", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fake_quant_forward_rounds_ties_to_even(impl, case):
    name, device, fwd, _ = impl
    bits, group_size, k, symmetric = case
    W, hi, lo = tie_inputs(bits, group_size, k, symmetric)
    expected = expected_what(W, bits, group_size, symmetric)
    S = torch.rand(W.shape) + 0.1
    delta = torch.randn(W.shape) * 0.1
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the tie values are exact in all three
        args = [t.to(device) for t in (W.to(dtype), hi, lo, S.to(dtype), delta.to(dtype))]
        what, reg = fwd(*args, bits, group_size, symmetric)
        assert what.dtype == dtype
        wrong = (what.float().cpu() != expected).sum().item()
        assert wrong == 0, f"{name} {dtype}: {wrong} elements not rounded half to even"
        Sd, dd = S.to(dtype).double(), delta.to(dtype).double()
        reg_expected = (Sd * (expected.double() + dd - W.double()) ** 2).sum()
        assert abs(reg.item() - reg_expected.item()) <= 1e-5 * reg_expected.item(), (name, dtype)


@pytest.mark.parametrize("impl", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fake_quant_backward_at_ties(impl, case):
    """dWhat/ds = round(u) - u is +-0.5 at a tie: the logits' gradients follow the rounding direction. The
    reference is checked against the autograd of the torch.round composite; the others against the reference."""
    name, device, _, bwd = impl
    bits, group_size, k, symmetric = case
    W, hi, lo = tie_inputs(bits, group_size, k, symmetric)
    S = torch.rand(W.shape) + 0.1
    delta = torch.randn(W.shape) * 0.1
    grad = torch.randn(W.shape)
    lam = torch.tensor(0.3)
    if name == "ref":
        Wc, hic, loc, dc = (t.clone().requires_grad_() for t in (W, hi, lo, delta))
        what_c = omniquant_fake_quant(Wc, hic, loc, bits, group_size, symmetric)
        loss = (what_c * grad).sum() + lam * (S * (what_c + dc - Wc) ** 2).sum()
        expected = torch.autograd.grad(loss, (Wc, hic, loc, dc))
    else:
        expected = ref.fake_quant_lwc_bwd(grad, lam, W, hi, lo, S, delta, bits, group_size, symmetric, True)
    args = [t.to(device) for t in (grad, lam, W, hi, lo, S, delta)]
    got = bwd(*args, bits, group_size, symmetric, True)
    for label, a, b in zip(("dW", "dhi", "dlo", "ddelta"), got, expected):
        a, b = a.detach().double().cpu(), b.detach().double()
        assert torch.isfinite(a).all(), f"{name} {label}: non-finite (unwritten?)"
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= 1e-5, f"{name} {label}: relative error {err:.3g}"
    assert expected[1].abs().sum() > 0 and expected[2].abs().sum() > 0  # the logits get real gradients
