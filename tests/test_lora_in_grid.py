"""Quantization-grid-aware low rank (LR-QAT): the update trains through the quantizer and ends up in the codes."""
import torch

from saliq import ref
from saliq.nn import FakeQuantLinear
from saliq.spec import QuantSpec


def _layer(bits=2, seed=0):
    torch.manual_seed(seed)
    fq = FakeQuantLinear(torch.randn(40, 128) * 0.1, None, QuantSpec(bits, 64), lora_rank=8, lora_in_grid=True)
    with torch.no_grad():
        fq.lora_B.normal_(0, 0.5)
    return fq


def test_the_update_is_measured_in_steps_and_moves_codes():
    fq = _layer()
    d = fq.grid_delta()
    Wg = ref._grouped(fq.weight, 64)
    s = ref.scale_zero(Wg.amax(-1), Wg.amin(-1), torch.sigmoid(fq.hi), torch.sigmoid(fq.lo), 2, False)[0]
    plain = (fq.lora_scale * fq.lora_B @ fq.lora_A).reshape(40, 2, 64) * s[..., None]
    assert torch.allclose(d, plain.reshape(40, 128))
    q0 = ref.lwc_quantize(fq.weight, fq.hi, fq.lo, 2, 64, False)[0]
    q1 = ref.lwc_quantize(fq.weight + d, fq.hi, fq.lo, 2, 64, False)[0]
    assert (q0 != q1).float().mean() > 0.05


def test_gradients_flow_to_the_low_rank_factors_and_the_packed_layer_has_no_lora():
    fq = _layer(bits=3)
    fq.set_saliency(torch.rand(40, 128))
    x = torch.randn(5, 128)
    y = fq(x)
    (y.square().mean() + fq.penalty).backward()
    assert fq.lora_A.grad.abs().sum() > 0 and fq.lora_B.grad.abs().sum() > 0 and fq.hi.grad.abs().sum() > 0
    fq.set_saliency(None)
    ql = fq.to_quant_linear()
    assert ql.lora_rank == 0 and ql.lora_A is None
    with torch.no_grad():
        assert torch.allclose(ql(x), fq(x), rtol=1e-5, atol=1e-6)


def test_the_penalty_compares_with_the_original_weight():
    fq = _layer()
    S = torch.rand(40, 128)
    fq.set_saliency(S)
    with torch.no_grad():
        what, reg = fq._quantize(True)
    assert torch.allclose(reg, (S * (what - fq.weight) ** 2).sum(), rtol=1e-5)
