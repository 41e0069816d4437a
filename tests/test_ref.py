"""The reference (the specification) against an independent ApiQ/OmniQuant-style composite."""
import pytest
import torch

from composite import omniquant_fake_quant
from conftest import rel_err
from saliq import ref

GROUPS = [32, 64, 128, -1]


def _inputs(n, k, group_size, requires_w=False):
    W = torch.randn(n, k) * 0.05
    G = 1 if group_size == -1 else k // group_size
    # logits spread around the default 4.0 so clipping actually bites in some groups
    hi = (torch.randn(n, G) * 1.5 + 2.0).requires_grad_()
    lo = (torch.randn(n, G) * 1.5 + 2.0).requires_grad_()
    return W.requires_grad_(requires_w), hi, lo


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_and_gradients_match_composite(bits, group_size, symmetric):
    n, k = 37, 256
    W, hi, lo = _inputs(n, k, group_size, requires_w=True)
    grad = torch.randn(n, k)
    what_c = omniquant_fake_quant(W, hi, lo, bits, group_size, symmetric)
    dW_c, dhi_c, dlo_c = torch.autograd.grad((what_c * grad).sum(), (W, hi, lo))

    what, reg = ref.fake_quant_lwc_fwd(W.detach(), hi.detach(), lo.detach(), None, None, bits, group_size,
                                       symmetric)
    assert torch.equal(what, what_c.detach())
    assert reg.item() == 0.0
    dW, dhi, dlo, ddelta = ref.fake_quant_lwc_bwd(grad, torch.zeros(()), W.detach(), hi.detach(), lo.detach(),
                                                  None, None, bits, group_size, symmetric, True)
    assert ddelta is None
    assert rel_err(dhi, dhi_c) < 1e-5 and rel_err(dlo, dlo_c) < 1e-5
    assert rel_err(dW, dW_c) < 1e-5
    assert dhi.abs().sum() > 0 and dlo.abs().sum() > 0  # the test exercises real gradients


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("after_lora", [False, True])
def test_fused_saliency_term_matches_composite(bits, after_lora):
    n, k, gs = 33, 128, 64
    W, hi, lo = _inputs(n, k, gs)
    S = torch.rand(n, k) * 3
    delta = (torch.randn(n, k) * 0.01).requires_grad_() if after_lora else None
    lam = 0.37
    grad = torch.randn(n, k)
    what_c = omniquant_fake_quant(W, hi, lo, bits, gs, False)
    weff = what_c + delta if after_lora else what_c
    reg_c = (S * (weff - W) ** 2).sum()
    wrt = (hi, lo, delta) if after_lora else (hi, lo)
    grads_c = torch.autograd.grad((what_c * grad).sum() + lam * reg_c, wrt)

    what, reg = ref.fake_quant_lwc_fwd(W, hi.detach(), lo.detach(), S, None if delta is None else delta.detach(),
                                       bits, gs, False)
    assert torch.equal(what, what_c.detach())
    assert rel_err(reg, reg_c.detach()) < 1e-6
    _, dhi, dlo, ddelta = ref.fake_quant_lwc_bwd(grad, torch.tensor(lam), W, hi.detach(), lo.detach(), S,
                                                 None if delta is None else delta.detach(), bits, gs, False, False)
    assert rel_err(dhi, grads_c[0]) < 1e-5 and rel_err(dlo, grads_c[1]) < 1e-5
    if after_lora:
        assert rel_err(ddelta, grads_c[2]) < 1e-5


def test_trainable_weight_gradient_includes_saliency_and_extreme_paths():
    n, k, gs = 9, 64, 32
    W, hi, lo = _inputs(n, k, gs, requires_w=True)
    S = torch.rand(n, k)
    what_c = omniquant_fake_quant(W, hi, lo, 2, gs, False)
    reg_c = (S * (what_c - W) ** 2).sum()
    dW_c, = torch.autograd.grad(what_c.sum() + reg_c, (W,))
    dW, *_ = ref.fake_quant_lwc_bwd(torch.ones(n, k), torch.tensor(1.0), W.detach(), hi.detach(), lo.detach(),
                                    S, None, 2, gs, False, True)
    assert rel_err(dW, dW_c) < 1e-5


def test_clamped_scale_blocks_logit_gradients():
    # a constant group has range 0: the scale clamps at its minimum and no gradient reaches hi / lo
    W = torch.full((4, 32), 0.5)
    hi = torch.zeros(4, 1)
    lo = torch.zeros(4, 1)
    _, dhi, dlo, _ = ref.fake_quant_lwc_bwd(torch.randn(4, 32), torch.zeros(()), W, hi, lo, None, None, 2, 32,
                                            False, False)
    assert torch.all(dhi == 0) and torch.all(dlo == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32_and_casts_once(dtype):
    W, hi, lo = _inputs(17, 128, 64)
    W = W.to(dtype)
    what, _ = ref.fake_quant_lwc_fwd(W, hi.detach(), lo.detach(), None, None, 3, 64, False)
    what32, _ = ref.fake_quant_lwc_fwd(W.float(), hi.detach(), lo.detach(), None, None, 3, 64, False)
    assert what.dtype == dtype
    assert torch.equal(what, what32.to(dtype))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_is_lwc_without_clipping(bits):
    W = torch.randn(11, 128)
    q, s, z = ref.rtn_quantize(W, bits, 64, False)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    Wg = W.reshape(11, 2, 64)
    assert torch.allclose(s, (Wg.amax(-1) - Wg.amin(-1)) / (2**bits - 1))
    deq = ((q.reshape(11, 2, 64) - z[..., None]) * s[..., None]).reshape(11, 128)
    # round to nearest: every element within half a step of the original
    assert ((deq - W).abs().reshape(11, 2, 64) <= s[..., None] / 2 + 1e-6).all()


def test_saliency_sq_error_and_gradient():
    A, B, S = torch.randn(5, 7), torch.randn(5, 7), torch.rand(5, 7)
    loss, grad = ref.saliency_sq_error(A, B, S, True)
    assert torch.allclose(loss, (S * (A - B) ** 2).sum())
    assert torch.allclose(grad, 2 * S * (A - B))
    loss, grad = ref.saliency_sq_error(A, B, None, False)
    assert torch.allclose(loss, ((A - B) ** 2).sum()) and grad is None


def test_packed_matmul_with_bias_and_lora():
    from saliq.packing import pack_weight
    from saliq.spec import QuantSpec

    W = torch.randn(13, 64)
    q, s, z = ref.rtn_quantize(W, 2, 32, False)
    p = pack_weight(q, s, z, QuantSpec(2, 32))
    x, bias = torch.randn(3, 64), torch.randn(13)
    A, B = torch.randn(4, 64), torch.randn(13, 4)
    What = ((q.reshape(13, 2, 32) - z[..., None]) * s[..., None]).reshape(13, 64)
    y = ref.packed_linear(x, p, bias, A, B, 0.5)
    assert rel_err(y, x @ What.t() + bias + 0.5 * (x @ A.t()) @ B.t()) < 1e-6
