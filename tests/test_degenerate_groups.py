"""Degenerate weight groups (docs/FORMAT.md): constant, near-constant, all-zero, far-from-zero and huge.

The rule: an asymmetric scale is at least max(|xmax|, |xmin|) / 2^13, so the zero point stays inside
+-2^13 and a constant group c (|c| >= 2^13 * SCALE_MIN) dequantizes to c exactly; weights beyond
+-WEIGHT_BOUND are refused. Every backend that implements an op is held to the same rule, bit for bit in fp32.
"""
import pytest
import torch

from composite import omniquant_fake_quant
from saliq import backends, ops, ref
from saliq.nn import FakeQuantLinear, QuantLinear
from saliq.packing import pack_weight
from saliq.spec import QuantSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOOR = ref.SCALE_FLOOR_FACTOR
# exactly representable constants whose c / 2^13 is a normal fp16 number and above SCALE_MIN
EXACT_CONSTANTS = [0.5, -0.75, 3.0, -1000.0, 0.125, ref.WEIGHT_BOUND, -ref.WEIGHT_BOUND]


def _backends(op, device):
    found = [b for b in backends.available(op, device) if b != "ref"]
    assert found or device == "cuda", f"no compiled backend implements {op} on {device}"
    return found or ["ref"]


def _constant_rows(values, k):
    return torch.tensor(values, dtype=torch.float32)[:, None].expand(len(values), k).contiguous()


def _rtn_packed(W, bits, group_size, symmetric=False, dtype=None):
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    q, s, z = ref.rtn_quantize(W, bits, group_size, symmetric)
    return pack_weight(q, s, z, spec, dtype=dtype or W.dtype), q, s, z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_constant_groups_round_trip_exactly(device, bits, group_size):
    W = _constant_rows(EXACT_CONSTANTS + [0.0], 128)
    packed, q, s, z = _rtn_packed(W.to(device), bits, group_size)
    assert int(z.abs().max()) <= 2**13  # the zero point never reaches its clamp
    for backend in _backends("dequantize", device):
        with backends.use_backend(backend):
            out = ops.dequantize(packed).cpu()
        assert torch.equal(out, W), f"{backend}: {out[:, 0].tolist()} != {W[:, 0].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_constant_groups_round_trip_exactly_in_half_precision(dtype):
    # c and c / 2^13 are exact in the stored dtype, so nothing rounds
    W = _constant_rows([0.5, -0.75, 3.0, -1000.0], 64).to(dtype)
    packed, *_ = _rtn_packed(W, 2, 64)
    assert torch.equal(ops.dequantize(packed), W)


@pytest.mark.parametrize("c", [0.01, -0.05, 3e-4, 1e-6])
def test_small_constants_are_within_half_the_minimum_scale(c):
    # below 2^13 * SCALE_MIN the scale is SCALE_MIN and the group lands on its nearest multiple
    W = _constant_rows([c], 64)
    packed, q, s, z = _rtn_packed(W, 2, 64)
    assert float(s) == pytest.approx(ref.SCALE_MIN)
    err = (ops.dequantize(packed) - W).abs().max().item()
    assert err <= ref.SCALE_MIN / 2 * (1 + 1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_near_constant_and_far_from_zero_groups_keep_their_values(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    base = torch.tensor([0.5, -2.0, 100.0, -3000.0])[:, None]
    spread = torch.tensor([1e-7, 1e-5, 1e-3, 0.5])[:, None]
    W = (base + spread * torch.rand(4, 64, generator=g)).float()
    q, s, z = ref.rtn_quantize(W, bits, 64, symmetric)
    What = ((q.float() - z) * s)
    # every element is within half a step of its value, and the step is never coarser than needed
    assert ((What - W).abs() <= s / 2 * (1 + 1e-5) + W.abs() * 2**-23).all()
    if not symmetric:
        assert int(z.abs().max()) <= 2**13
        step_needed = (W.amax(1) - W.amin(1)) / ((1 << bits) - 1)
        assert (s.squeeze(1) <= torch.maximum(step_needed, W.abs().amax(1) * FLOOR) * (1 + 1e-6)).all()


def _degenerate_weight(n_random=6, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.full((k,), 0.5),                                   # constant
        torch.full((k,), -3.0),                                  # constant, negative
        torch.zeros(k),                                          # all zero
        0.25 + 1e-7 * torch.rand(k, generator=g),                # near-constant
        100.0 + 1e-3 * torch.randn(k, generator=g),              # one-signed, far from zero
        torch.cat([torch.full((k // 2,), 0.125), torch.randn(k // 2, generator=g) * 0.05]),  # half constant
    ]
    rows += [torch.randn(k, generator=g) * 0.05 for _ in range(n_random)]
    return torch.stack(rows).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_backend_quantizes_degenerate_groups_as_the_reference(device, bits, symmetric):
    W = _degenerate_weight()
    G = W.shape[1] // 32
    g = torch.Generator().manual_seed(bits)
    hi = torch.randn(W.shape[0], G, generator=g) + 3.0
    lo = torch.randn(W.shape[0], G, generator=g) + 3.0
    hi[:3] = lo[:3] = 30.0  # sigmoid = 1 in fp32: no clipping, so the constant rows must come back exactly
    S = torch.rand(W.shape, generator=g)
    grad = torch.randn(W.shape, generator=g)
    spec = QuantSpec(bits=bits, group_size=32, symmetric=symmetric)
    what_r, reg_r = ref.fake_quant_lwc_fwd(W, hi, lo, S, None, bits, 32, symmetric)
    _, dhi_r, dlo_r, _ = ref.fake_quant_lwc_bwd(grad, torch.tensor(0.3), W, hi, lo, S, None, bits, 32, symmetric,
                                                False)
    if not symmetric:
        assert torch.equal(what_r[:3], W[:3])
    for backend in _backends("fake_quant_lwc_fwd", device):
        h = hi.to(device, copy=True).requires_grad_()
        l_ = lo.to(device, copy=True).requires_grad_()
        with backends.use_backend(backend):
            what, reg = ops.fake_quant_lwc(W.to(device), h, l_, spec, S.to(device))
            ((what * grad.to(device)).sum() + 0.3 * reg).backward()
        assert torch.equal(what.detach().cpu(), what_r), backend
        torch.testing.assert_close(h.grad.cpu(), dhi_r, rtol=1e-5, atol=1e-9, msg=backend)
        torch.testing.assert_close(l_.grad.cpu(), dlo_r, rtol=1e-5, atol=1e-9, msg=backend)


@pytest.mark.parametrize("bits", [2, 4])
def test_reference_gradient_is_the_composites_autograd_on_degenerate_groups(bits):
    W = _degenerate_weight(n_random=2)
    G = W.shape[1] // 32
    hi = torch.randn(W.shape[0], G) + 3.0
    lo = torch.randn(W.shape[0], G) + 3.0
    lo[:4] = hi[:4]  # equal clipping keeps the (near-)constant groups' range (near) zero
    hi.requires_grad_()
    lo.requires_grad_()
    grad = torch.randn(W.shape)
    (omniquant_fake_quant(W, hi, lo, bits, 32, False) * grad).sum().backward()
    _, dhi, dlo, _ = ref.fake_quant_lwc_bwd(grad, torch.tensor(0.0), W, hi.detach(), lo.detach(), None, None,
                                            bits, 32, False, False)
    torch.testing.assert_close(dhi, hi.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(dlo, lo.grad, rtol=1e-5, atol=1e-9)
    # where the floor sets the scale (the constant and near-constant groups) no gradient flows into it
    assert (dhi[:4] == 0).all() and (dlo[:4] == 0).all()


@pytest.mark.parametrize("make", [
    lambda W: QuantLinear.from_linear(_linear(W), QuantSpec(bits=2, group_size=32)),
    lambda W: FakeQuantLinear(W, None, QuantSpec(bits=2, group_size=32)),
])
@pytest.mark.parametrize("bad", [2e4, -1e30])
def test_weights_beyond_the_bound_are_refused(make, bad):
    W = torch.randn(4, 64) * 0.05
    W[2, 17] = bad
    with pytest.raises(ValueError, match=r"weight has 1 values beyond \+-10000 \(first at index \(2, 17\)"):
        make(W)


def test_weights_at_the_bound_are_accepted_and_exact():
    W = torch.randn(4, 64) * 0.05
    W[1, :32] = ref.WEIGHT_BOUND
    W[3, :32] = -ref.WEIGHT_BOUND
    layer = QuantLinear.from_linear(_linear(W), QuantSpec(bits=2, group_size=32))
    out = ops.dequantize(layer.packed)
    assert torch.equal(out[1, :32], W[1, :32]) and torch.equal(out[3, :32], W[3, :32])


def _linear(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin
