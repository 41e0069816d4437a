"""Triton LWC fake quantization against saliq.ref and against the autograd of an ApiQ-style composite."""
import pytest
import torch
from triton_setup import DEVICE, DTYPES, hermetic_kernels  # noqa: F401  (skips without Triton)

from composite import omniquant_fake_quant
from conftest import TOLERANCE, assert_close, rel_err
from saliq import ops, ref
from saliq.kernels import fake_quant as fq
from saliq.spec import QuantSpec


def _inputs(n, k, group_size, dtype, ties=False):
    W = torch.randn(n, k, device=DEVICE) * 0.05
    if ties:
        # a coarse grid: many elements share the group max / min (the even-sharing path of dW)
        W = (W * 40).round() / 40
        W[0, :] = 0.01  # a constant row: s_raw = 0 is clamped, so its scale gradient is gated off
    W = W.to(dtype)
    G = 1 if group_size == -1 else k // group_size
    hi = torch.randn(n, G, device=DEVICE) * 1.5 + 2.0
    lo = torch.randn(n, G, device=DEVICE) * 1.5 + 2.0
    S = torch.rand(n, k, device=DEVICE).to(dtype)
    delta = (torch.randn(n, k, device=DEVICE) * 0.01).to(dtype)
    return W, hi, lo, S, delta


def _check_fwd(W, hi, lo, S, delta, bits, group_size, symmetric):
    what, reg = fq.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    what_r, reg_r = ref.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    assert what.dtype == W.dtype and reg.dtype == torch.float32 and reg.shape == ()
    assert_close(what, what_r, W.dtype, "What")
    if W.dtype == torch.float32:
        assert torch.equal(what, what_r)  # same fp32 operations, IEEE divisions: bit-exact
    if S is None:
        assert reg.item() == 0.0
    else:
        assert rel_err(reg, reg_r) <= 1e-5


def _check_bwd(W, hi, lo, S, delta, bits, group_size, symmetric, need_dW=True):
    gw = torch.randn(W.shape, device=DEVICE).to(W.dtype)
    greg = torch.tensor(0.37, device=DEVICE)
    out = fq.fake_quant_lwc_bwd(gw, greg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)
    exp = ref.fake_quant_lwc_bwd(gw, greg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)
    for name, o, e in zip(("dW", "dhi", "dlo", "ddelta"), out, exp):
        if e is None:
            assert o is None, name
            continue
        assert o.dtype == e.dtype, name
        # dhi, dlo are fp32 sums of fp32 terms: only the summation order differs
        assert_close(o, e, torch.float32 if name in ("dhi", "dlo") else W.dtype, name)
    assert exp[1].abs().sum() > 0 and exp[2].abs().sum() > 0  # real gradients are exercised
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_and_backward_match_ref(bits, group_size, symmetric, dtype):
    n, k = 37, 256
    W, hi, lo, S, delta = _inputs(n, k, group_size, dtype)
    _check_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    _check_bwd(W, hi, lo, S, delta, bits, group_size, symmetric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_whole_tiles_match_ref(group_size, symmetric, dtype):
    """Shapes whose tiles are all whole take the unmasked kernels (tiles_are_even): the same results as ref,
    with ties to the group max / min and a constant group row included."""
    block_r = fq._candidates(group_size)[0]["BLOCK_R"]
    n, k = block_r, 2 * group_size  # R = 2 * block_r group rows: two whole tiles
    assert fq.tiles_are_even(n * (k // group_size), group_size, block_r, group_size)
    W, hi, lo, S, delta = _inputs(n, k, group_size, dtype, ties=True)
    _check_fwd(W, hi, lo, S, delta, 3, group_size, symmetric)
    _check_bwd(W, hi, lo, S, delta, 3, group_size, symmetric)


def test_round_half_even_is_torch_round_bit_for_bit():
    """The kernels' rounding on ties, signed zeros, values past 2^22 and 2^23, infinities and random fp32 bit
    patterns: the bits torch.round gives."""
    import triton
    import triton.language as tl

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y_ptr + o, fq._round_half_even(tl.load(x_ptr + o)))

    special = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 0.5000001, 1.4999999, 0.0, -0.0,
                            -0.3, 1e-45, -1e-45, 2.0**22 + 0.5, 2.0**22 + 1.5, 2.0**23 - 0.5, -(2.0**23 - 0.5),
                            2.0**23 + 1.0, 1e30, -1e30, float("inf"), float("-inf")])
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 13,), generator=g, dtype=torch.int64).to(torch.int32)
    patterns = bits.view(torch.float32)
    halves = torch.arange(-4096, 4096, dtype=torch.float32) * 0.5
    x = torch.cat([special, patterns[torch.isfinite(patterns)], halves])
    n = 1 << (x.numel() - 1).bit_length()
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, n)
    assert torch.equal(y.view(torch.int32), torch.round(x).view(torch.int32))


def test_tiles_are_even_needs_whole_rows_and_groups():
    assert fq.tiles_are_even(512, 64, 256, 64)
    assert not fq.tiles_are_even(513, 64, 256, 64)  # a partial last tile
    assert not fq.tiles_are_even(512, 100, 256, 128)  # groups shorter than the tile's width


@pytest.mark.parametrize("with_s,with_delta,need_dW", [(False, False, False), (False, False, True),
                                                       (True, False, False), (True, True, False)])
@pytest.mark.parametrize("bits", [2, 3])
def test_optional_terms(bits, with_s, with_delta, need_dW):
    n, k, g = 133, 128, 64
    W, hi, lo, S, delta = _inputs(n, k, g, torch.float32)
    S = S if with_s else None
    delta = delta if with_delta else None
    _check_fwd(W, hi, lo, S, delta, bits, g, False)
    _check_bwd(W, hi, lo, S, delta, bits, g, False, need_dW)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k", [(133, 200), (5, 37)])
def test_per_channel_odd_k(n, k, symmetric):
    # one group spanning a K that is not a power of two: the group row is masked
    W, hi, lo, S, delta = _inputs(n, k, -1, torch.float32)
    _check_fwd(W, hi, lo, S, delta, 3, -1, symmetric)
    _check_bwd(W, hi, lo, S, delta, 3, -1, symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ties_and_clamped_scales(symmetric):
    W, hi, lo, S, delta = _inputs(37, 128, 32, torch.float32, ties=True)
    _check_fwd(W, hi, lo, S, delta, 2, 32, symmetric)
    _check_bwd(W, hi, lo, S, delta, 2, 32, symmetric)


def test_deterministic():
    W, hi, lo, S, delta = _inputs(133, 256, 64, torch.float32)
    a = fq.fake_quant_lwc_fwd(W, hi, lo, S, delta, 2, 64, False)
    b = fq.fake_quant_lwc_fwd(W, hi, lo, S, delta, 2, 64, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gw = torch.randn(W.shape, device=DEVICE)
    g = torch.tensor(0.5, device=DEVICE)
    x = fq.fake_quant_lwc_bwd(gw, g, W, hi, lo, S, delta, 2, 64, False, True)
    y = fq.fake_quant_lwc_bwd(gw, g, W, hi, lo, S, delta, 2, 64, False, True)
    assert all(torch.equal(p, q) for p, q in zip(x, y))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 128), (4, 32)])
def test_custom_op_matches_composite_autograd(bits, group_size, symmetric):
    """Through saliq.ops on the triton backend: What, reg and the gradients of W, hi, lo equal the autograd
    of the ApiQ-style composite plus lambda * sum S (What - W)^2."""
    n, k, lam = 37, 256, 0.1
    W0, hi0, lo0, S, _ = _inputs(n, k, group_size, torch.float32)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    grad = torch.randn(n, k, device=DEVICE)

    W, hi, lo = (t.clone().requires_grad_() for t in (W0, hi0, lo0))
    what_c = omniquant_fake_quant(W, hi, lo, bits, group_size, symmetric)
    loss_c = (what_c * grad).sum() + lam * (S * (what_c - W) ** 2).sum()
    loss_c.backward()

    W2, hi2, lo2 = (t.clone().requires_grad_() for t in (W0, hi0, lo0))
    with ops.use_backend("triton"):
        what, reg = ops.fake_quant_lwc(W2, hi2, lo2, spec, S=S)
        loss = (what * grad).sum() + lam * reg
        loss.backward()
    assert torch.equal(what.detach(), what_c.detach())
    assert rel_err(loss.detach(), loss_c.detach()) <= 1e-5
    for name, a, b in (("dW", W2.grad, W.grad), ("dhi", hi2.grad, hi.grad), ("dlo", lo2.grad, lo.grad)):
        assert rel_err(a, b) <= TOLERANCE[torch.float32], name


def test_after_lora_delta_gradient():
    """The after-LoRA penalty sum S (What + delta - W)^2: delta's gradient through the custom op."""
    n, k = 37, 128
    W, hi0, lo0, S, delta0 = _inputs(n, k, 64, torch.float32)
    spec = QuantSpec(bits=2, group_size=64)
    grads = {}
    for backend in ("ref", "triton"):
        hi, lo, delta = (t.clone().requires_grad_() for t in (hi0, lo0, delta0))
        with ops.use_backend(backend):
            what, reg = ops.fake_quant_lwc(W, hi, lo, spec, S=S, delta=delta)
            (what.sum() + 0.3 * reg).backward()
        grads[backend] = (hi.grad, lo.grad, delta.grad, reg.detach())
    for a, b in zip(grads["triton"], grads["ref"]):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.gpu
def test_llama_shape_on_gpu():
    W, hi, lo, S, delta = _inputs(4096, 11008, 64, torch.float16)
    _check_fwd(W, hi, lo, S, None, 2, 64, False)
    _check_bwd(W, hi, lo, S, None, 2, 64, False, need_dW=False)
