"""Outlier reservation: selection, the fill that keeps reserved weights out of their groups, exact 16-bit storage,
and the packed layer with its sparse part against a dense reference, through save and load."""
import pytest
import torch

from fixtures_llama import make_byte_tokenizer, make_tiny_llama, random_samples
from saliq import hf, outliers, ref
from saliq.nn import FakeQuantLinear, QuantLinear
from saliq.spec import QuantSpec


def _dense_what(fq: FakeQuantLinear) -> torch.Tensor:
    """What of the layer as the specification defines it: the filled weight quantized, reserved weights stored."""
    W = fq.base_weight()
    q, s, z = ref.lwc_quantize(W, fq.hi, fq.lo, fq.spec.bits, fq.spec.group_size, fq.spec.symmetric)
    g = fq.spec.group_len(W.shape[1])
    what = ((q.float().reshape(W.shape[0], -1, g) - z[..., None]) * s[..., None]).reshape(W.shape)
    return torch.where(fq.reserved, fq.weight.half().float(), what)


@pytest.mark.parametrize("score", outliers.SCORES)
def test_select_takes_the_largest_scores(score):
    torch.manual_seed(0)
    W, S = torch.randn(24, 128), torch.rand(24, 128)
    mask = outliers.select(W, S, QuantSpec(2, 64), 0.05, score)
    assert int(mask.sum()) == round(0.05 * W.numel())
    if score == "magnitude":
        value = S * W**2
    else:
        q, s, z = ref.rtn_quantize(W, 2, 64, False)
        what = ((q.float().reshape(24, 2, 64) - z[..., None]) * s[..., None]).reshape(24, 128)
        value = S * (what - W) ** 2
    assert float(value[mask].min()) >= float(value[~mask].max())


def test_the_fill_lies_inside_the_range_of_the_groups_other_weights():
    torch.manual_seed(1)
    W = torch.randn(8, 128)
    W[0, 3], W[5, 70] = 40.0, -30.0  # outliers that would stretch their groups
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[0, 3] = mask[5, 70] = True
    filled = outliers.fill_reserved(W, mask, QuantSpec(2, 64))
    assert torch.equal(filled[~mask], W[~mask])
    for (r, c) in ((0, 3), (5, 70)):
        g0 = (c // 64) * 64
        others = torch.cat([W[r, g0:c], W[r, c + 1 : g0 + 64]])
        assert others.min() <= filled[r, c] <= others.max()


def test_csr_holds_every_reserved_weight_in_16_bits():
    torch.manual_seed(2)
    W = torch.randn(17, 96)
    mask = torch.rand(17, 96) < 0.03
    mask[4] = False  # an empty row
    rowptr, cols, values = outliers.to_csr(W, mask)
    assert rowptr.dtype == torch.int32 and cols.dtype == torch.int16 and values.dtype == torch.float16
    rows = torch.repeat_interleave(torch.arange(17), rowptr.long().diff())
    rebuilt = torch.zeros(17, 96, dtype=torch.bool)
    rebuilt[rows, cols.long()] = True
    assert torch.equal(rebuilt, mask)
    assert torch.equal(values, W[mask].half())
    big = W.clone()
    big[mask] *= 1e5  # beyond fp16: bf16 keeps the range
    assert outliers.to_csr(big, mask)[2].dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reserved_layer_trains_without_the_outliers_and_packs_to_the_same_output(bits):
    torch.manual_seed(3)
    spec = QuantSpec(bits, 32)
    fq = FakeQuantLinear(torch.randn(33, 96) * 0.1, torch.randn(33), spec, lora_rank=4)
    with torch.no_grad():
        fq.lora_B.normal_(0, 0.05)
        fq.weight[2, 5] = 3.0  # an outlier
    mask = outliers.select(fq.weight, None, spec, 0.02, "magnitude")
    assert mask[2, 5]
    fq.reserve(mask)
    S = torch.rand(33, 96)
    fq.set_saliency(S)
    x = torch.randn(7, 96)
    y = fq(x)
    what = _dense_what(fq)
    want = x @ what.t() + fq.bias + fq.lora_scale * (x @ fq.lora_A.t()) @ fq.lora_B.t()
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    # no penalty where the weight is kept exactly
    assert torch.allclose(fq.penalty, (S * ~mask * (what - fq.weight) ** 2).sum(), rtol=1e-5)
    (y.sum() + fq.penalty).backward()
    assert fq.hi.grad.abs().sum() > 0
    fq.set_saliency(None)
    ql = fq.to_quant_linear()
    assert ql.reserved == int(mask.sum())
    with torch.no_grad():
        assert torch.allclose(ql(x), fq(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(ql.dequantized_weight(), what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reserved_layer_converted_to_half_keeps_fp32_corrections(dtype):
    # Module.to(dtype) converts every float buffer: the corrections are derived again, in fp32, against the
    # converted scales, so the output is still the converted dense weight's
    torch.manual_seed(5)
    spec = QuantSpec(2, 32)
    fq = FakeQuantLinear(torch.randn(40, 64) * 0.1, torch.randn(40), spec, lora_rank=0)
    fq.reserve(outliers.select(fq.weight, None, spec, 0.05, "magnitude"))
    ql = fq.to_quant_linear().to(dtype)
    assert ql.sparse_correction.dtype == torch.float32 and ql.scales.dtype == dtype
    x = torch.randn(3, 64).to(dtype)
    want = x.float() @ ql.dequantized_weight().float().t() + ql.bias.float()
    with torch.no_grad():
        got = ql(x)
    assert got.dtype == dtype
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


def test_a_model_with_reserved_weights_round_trips_through_a_checkpoint(tmp_path):
    from saliq.cli import describe_checkpoint

    model = make_tiny_llama()
    spec = QuantSpec(2, 32)
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            fq = FakeQuantLinear.from_linear(lin, spec, lora_rank=0)
            fq.reserve(outliers.select(fq.weight, None, spec, 0.01, "magnitude"))
            hf.set_submodule(block, name, fq.to_quant_linear(scale_dtype=torch.float16))
    x = random_samples(n=2, seqlen=12)
    hf.save(model, tmp_path, make_byte_tokenizer(), method="saliq")
    with torch.no_grad():
        before = model(input_ids=x).logits
    loaded, _ = hf.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, before)
    info = describe_checkpoint(tmp_path)
    n = info["quantized_weights"]
    nnz = sum(m.reserved for m in model.modules() if isinstance(m, QuantLinear))
    rows = sum(m.out_features + 1 for m in model.modules() if isinstance(m, QuantLinear))
    assert info["reserved_bytes"] == nnz * (2 + 2) + rows * 4  # fp16 value, int16 column, int32 row pointer
    assert info["bits_by_part"]["reserved_bits"] == pytest.approx(8 * info["reserved_bytes"] / n)


def test_the_packed_layer_with_reserved_weights_passes_gradients_to_its_input():
    torch.manual_seed(4)
    spec = QuantSpec(3, 32)
    fq = FakeQuantLinear(torch.randn(21, 64) * 0.1, None, spec, lora_rank=0)
    fq.reserve(outliers.select(fq.weight, None, spec, 0.03, "magnitude"))
    ql = fq.to_quant_linear()
    x = torch.randn(3, 64, requires_grad=True)
    ql(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ ql.dequantized_weight().t()).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
