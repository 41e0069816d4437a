"""One conformance test per op: every backend the registry has for the op on this machine's devices, run directly,
against saliq/ref.py (the specification) on fresh random inputs with odd shapes, its outputs NaN-poisoned first.
A backend is tested here by being registered (cpp on the CPU, triton under its interpreter without a GPU, triton
and cuda on a GPU); the per-backend suites (test_cpp_*, tests/kernels, test_cuda_gpu) go deeper into each."""
import itertools

import pytest
import torch

from conftest import assert_close
from saliq import backends, packing, ref
from test_cpp_backend import random_packed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


def _backends(op):
    """(device, backend) for every backend but ref that serves `op` on each device here."""
    params = []
    for device in _devices():
        dev = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        params += [pytest.param(dev, b, marks=marks, id=f"{dev}-{b}") for b in backends.available(op, dev)
                   if b != "ref"]
    return params or [pytest.param("cpu", None, marks=pytest.mark.skip(reason=f"no backend but ref serves {op}"))]


def _poison(device):
    """NaN in freed memory: an output element a backend never writes shows up."""
    for n in (1 << 12, 1 << 16, 1 << 20):
        torch.full((n,), float("nan"), device=device)


def _same(out, expected, dtype, what):
    """Outputs against the reference: tensors by relative error at dtype's tolerance (integers exactly), tuples
    element by element, None where the reference gives None."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(expected), f"{what}: {type(out)}"
        for i, (o, e) in enumerate(zip(out, expected)):
            _same(o, e, dtype, f"{what}[{i}]")
        return
    if expected is None:
        assert out is None, f"{what}: a tensor where the reference gives None"
        return
    assert out.shape == expected.shape and out.dtype == expected.dtype, \
        f"{what}: {tuple(out.shape)} {out.dtype} against {tuple(expected.shape)} {expected.dtype}"
    if not expected.is_floating_point():
        assert torch.equal(out.cpu(), expected.cpu()), f"{what}: integers differ"
        return
    assert_close(out, expected, dtype, what)


def _serves(op, backend, args) -> bool:
    """Whether a backend that is partial by shape takes this call: the cuda packed_matmul serves decode sizes only
    (saliq/regimes.py sends larger M to triton)."""
    if backend == "cuda" and op == "packed_matmul":
        from saliq.cpp_backend import cuda_max_m

        return args[0].shape[0] <= cuda_max_m(args[0].dtype)
    return True


def _check(op, device, backend, cases):
    impl = backends._impls[backend][op]
    cases = [c for c in cases if _serves(op, backend, c[2])]
    assert cases, f"{op}: no case {backend} serves"
    for label, dtype, args in cases:
        expected = getattr(packing if op in ("pack", "unpack") else ref, op)(*args)
        _poison(device)
        _same(impl(*args), expected, dtype, f"{op} {backend} {label}")


def _packed(n, k, bits, group_size, dtype, device):
    """A packed weight's arguments on `device` (test_cpp_backend.random_packed, drawn from this test's seed)."""
    p = random_packed(n, k, bits, group_size, dtype, seed=int(torch.randint(1 << 30, ())))
    return tuple(t.to(device) for t in (p.qweight, p.qweight_hi, p.scales, p.zeros)) + (bits, group_size, k)


# (N, K, group size): whole groups, a ragged per-channel row, groups of 32, and several column blocks of groups of 128
SHAPES = [(37, 192, 64), (5, 100, -1), (16, 96, 32), (300, 640, 128)]
# every shape with every dtype and bit width
GRID = list(itertools.product(SHAPES, DTYPES, (2, 3, 4)))


def _fake_quant_inputs(n, k, g, dtype, device):
    groups = 1 if g == -1 else k // g
    W = torch.randn(n, k, device=device).to(dtype)
    hi = torch.randn(n, groups, device=device) + 2.0
    lo = torch.randn(n, groups, device=device) + 2.0
    S = torch.rand(n, k, device=device)
    delta = (torch.randn(n, k, device=device) * 0.01).to(dtype)
    return W, hi, lo, S, delta


@pytest.mark.parametrize("device,backend", _backends("fake_quant_lwc_fwd"))
def test_fake_quant_lwc_fwd(device, backend):
    cases = []
    for (n, k, g), dtype, bits in GRID:
        W, hi, lo, S, delta = _fake_quant_inputs(n, k, g, dtype, device)
        for sym, with_s in ((False, True), (True, False)):
            args = (W, hi, lo, S if with_s else None, delta if with_s else None, bits, g, sym)
            cases.append((f"{n}x{k} g{g} {bits}-bit sym={sym} S={with_s} {dtype}", dtype, args))
    _check("fake_quant_lwc_fwd", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("fake_quant_lwc_bwd"))
def test_fake_quant_lwc_bwd(device, backend):
    cases = []
    for (n, k, g), dtype, bits in GRID:
        W, hi, lo, S, delta = _fake_quant_inputs(n, k, g, dtype, device)
        grad_what = torch.randn(n, k, device=device).to(dtype)
        grad_reg = torch.tensor(0.7, device=device)
        for sym, with_s, need_dw in ((False, True, True), (True, False, False)):
            args = (grad_what, grad_reg, W, hi, lo, S if with_s else None, delta if with_s else None, bits, g, sym,
                    need_dw)
            cases.append((f"{n}x{k} g{g} {bits}-bit sym={sym} S={with_s} dW={need_dw} {dtype}", dtype, args))
    _check("fake_quant_lwc_bwd", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("saliency_sq_error"))
def test_saliency_sq_error(device, backend):
    cases = []
    for shape, dtype in itertools.product(((37, 101), (3, 5, 7), (1000,)), DTYPES):
        A = torch.randn(shape, device=device).to(dtype)
        B = torch.randn(shape, device=device).to(dtype)
        S = torch.rand(shape, device=device)
        cases.append((f"{shape} S {dtype}", dtype, (A, B, S, True)))
        cases.append((f"{shape} no S {dtype}", dtype, (A, B, None, False)))
    _check("saliency_sq_error", device, backend, cases)


def _x_and_bias(m, n, k, dtype, device, with_bias):
    x = torch.randn(m, k, device=device).to(dtype)
    return x, torch.randn(n, device=device).to(dtype) if with_bias else None


@pytest.mark.parametrize("device,backend", _backends("packed_matmul"))
def test_packed_matmul(device, backend):
    cases = []
    for (n, k, g), dtype, bits in GRID:
        packed = _packed(n, k, bits, g, dtype, device)
        for m in (1, 5, 40):  # decode, batched decode, prefill
            x, bias = _x_and_bias(m, n, k, dtype, device, with_bias=m != 5)
            cases.append((f"M={m} {n}x{k} g{g} {bits}-bit {dtype}", dtype, (x, *packed, bias)))
    _check("packed_matmul", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("dequantize"))
def test_dequantize(device, backend):
    cases = [(f"{n}x{k} g{g} {bits}-bit {dtype}", dtype, _packed(n, k, bits, g, dtype, device))
             for (n, k, g), dtype, bits in GRID]
    _check("dequantize", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("pack"))
def test_pack(device, backend):
    cases = [(f"{n}x{k} {bits}-bit", torch.int32, (torch.randint(0, 1 << bits, (n, k), device=device)
                                                   .to(torch.uint8), bits))
             for n, k, _ in SHAPES for bits in (2, 3, 4)]
    _check("pack", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("unpack"))
def test_unpack(device, backend):
    cases = []
    for n, k, _ in SHAPES:
        for bits in (2, 3, 4):
            qweight, qweight_hi = packing.pack(torch.randint(0, 1 << bits, (n, k)).to(torch.uint8), bits)
            cases.append((f"{n}x{k} {bits}-bit", torch.uint8, (qweight.to(device), qweight_hi.to(device), bits, k)))
    _check("unpack", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("dense_linear"))
def test_dense_linear(device, backend):
    cases = []
    for (n, k, _), dtype in itertools.product(SHAPES, DTYPES):
        weight = torch.randn(n, k, device=device).to(dtype)
        for m in (1, 4, 33):
            x, bias = _x_and_bias(m, n, k, dtype, device, with_bias=m != 4)
            cases.append((f"M={m} {n}x{k} {dtype}", dtype, (x, weight, bias)))
    _check("dense_linear", device, backend, cases)


@pytest.mark.parametrize("device,backend", _backends("sparse_addmm"))
def test_sparse_addmm(device, backend):
    cases = []
    for (n, k, _), dtype in itertools.product(SHAPES, DTYPES):
        for m in (1, 6):
            counts = torch.randint(0, 4, (n,))
            counts[0] = 0  # an empty row
            rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
            cols = torch.randint(0, k, (int(counts.sum()),), dtype=torch.int32)
            vals = torch.randn(int(counts.sum()))
            y = torch.randn(m, n, device=device).to(dtype)
            x = torch.randn(m, k, device=device).to(dtype)
            cases.append((f"M={m} {n}x{k} nnz={len(vals)} {dtype}", dtype,
                          (y, x, rowptr.to(device), cols.to(device), vals.to(device))))
    _check("sparse_addmm", device, backend, cases)


def test_every_op_has_its_conformance_test():
    """A new op in the registry gets a test here, or this fails."""
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(backends.OPS) <= tested, sorted(set(backends.OPS) - tested)
