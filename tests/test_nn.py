"""FakeQuantLinear (calibration) and QuantLinear (inference)."""
import pytest
import torch

from conftest import rel_err
from saliq import ref
from saliq.backends import use_backend
from saliq.nn import FakeQuantLinear, QuantLinear
from saliq.packing import packed_rows, plane_widths
from saliq.spec import QuantSpec


def _trained_fake_quant(spec, lora_rank=8, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(128, 37, bias=bias).to(dtype)
    fq = FakeQuantLinear.from_linear(lin, spec, lora_rank=lora_rank, lora_alpha=16)
    with torch.no_grad():  # as after calibration: moved logits, non-zero LoRA B
        fq.hi.normal_(2.0, 1.0)
        fq.lo.normal_(2.0, 1.0)
        if lora_rank:
            fq.lora_B.normal_(0, 0.01)
    return lin, fq


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_to_quant_linear_matches_fake_quant(bits, group_size):
    _, fq = _trained_fake_quant(QuantSpec(bits, group_size))
    x = torch.randn(4, 128)
    ql = fq.to_quant_linear()
    assert rel_err(ql(x), fq(x).detach()) < 1e-6


def test_fake_quant_linear_forward_definition():
    _, fq = _trained_fake_quant(QuantSpec(2, 32))
    x = torch.randn(3, 128)
    what = ref.fake_quant_lwc_fwd(fq.weight, fq.hi.detach(), fq.lo.detach(), None, None, 2, 32, False)[0]
    want = x @ what.t() + fq.bias + (16 / 8) * (x @ fq.lora_A.t()) @ fq.lora_B.t()
    assert rel_err(fq(x), want) < 1e-6


def test_training_moves_only_logits_and_lora():
    lin, fq = _trained_fake_quant(QuantSpec(2, 32))
    trainable = {n for n, p in fq.named_parameters() if p.requires_grad}
    assert trainable == {"hi", "lo", "lora_A", "lora_B"}
    fq(torch.randn(2, 128)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fq.parameters())
    assert torch.equal(fq.weight, lin.weight.detach())


@pytest.mark.parametrize("after_lora", [False, True])
def test_penalty_fused_with_forward(after_lora):
    _, fq = _trained_fake_quant(QuantSpec(3, 64))
    S = torch.rand(37, 128)
    fq.set_saliency(S, after_lora=after_lora)
    fq(torch.randn(2, 128))
    what = fq.quantized_weight().detach()
    weff = what + (fq.lora_scale * fq.lora_B @ fq.lora_A).detach() if after_lora else what
    want = (S * (weff - fq.weight) ** 2).sum()
    assert rel_err(fq.penalty.detach(), want) < 1e-6
    assert rel_err(fq.compute_penalty().detach(), want) < 1e-6
    fq.penalty.backward()
    assert fq.hi.grad.abs().sum() > 0
    assert (fq.lora_B.grad is not None and fq.lora_B.grad.abs().sum() > 0) == after_lora


def test_penalty_requires_saliency():
    _, fq = _trained_fake_quant(QuantSpec(2, 32))
    with pytest.raises(RuntimeError, match="set_saliency"):
        fq.compute_penalty()
    with pytest.raises(ValueError, match=r"S has shape \(3, 3\)"):
        fq.set_saliency(torch.rand(3, 3))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_quant_linear_close_to_linear_and_state_dict_round_trip(bits):
    lin = torch.nn.Linear(256, 33)
    ql = QuantLinear.from_linear(lin, QuantSpec(bits, 64))
    x = torch.randn(5, 256)
    err = rel_err(ql(x).detach(), lin(x).detach())
    assert err < {2: 0.6, 3: 0.3, 4: 0.15}[bits]
    fresh = QuantLinear.empty(256, 33, QuantSpec(bits, 64), bias=True, dtype=torch.float32)
    fresh.load_state_dict(ql.state_dict())
    assert torch.equal(fresh(x), ql(x))
    assert set(ql.state_dict()) <= {"qweight", "qweight_hi", "scales", "zeros", "bias"}


def test_finish_loading_checks_the_loaded_buffers_before_ordering_the_words(monkeypatch):
    """A checkpoint's layer is checked as loaded (format v1 words), then ordered for the CPU: the check must not
    copy the words back to format v1 (a copy of every layer's words at load), and must refuse bad buffers."""
    from saliq import word_order

    ql = QuantLinear.from_linear(torch.nn.Linear(128, 40), QuantSpec(3, 64))
    ql.lora_A, ql.lora_B = torch.randn(4, 128), torch.randn(40, 4)
    state = ql.state_dict()
    fresh = QuantLinear.empty(128, 40, QuantSpec(3, 64), bias=True, dtype=torch.float32)
    for name, t in state.items():
        setattr(fresh, name, t.clone())
    monkeypatch.setattr(word_order, "to_v1", lambda *a: pytest.fail("format-v1 copy of the words at load"))
    fresh.finish_loading(check=True)
    assert word_order.is_cpu_order(fresh.qweight)
    monkeypatch.undo()
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), ql(x))
    bad = QuantLinear.empty(128, 40, QuantSpec(3, 64), bias=True, dtype=torch.float32)
    for name, t in state.items():
        setattr(bad, name, t.clone())
    bad.lora_B = torch.randn(41, 4)
    with pytest.raises(ValueError, match=r"lora_B \(41, 4\) must be"):
        bad.finish_loading(check=True)
    assert not word_order.is_cpu_order(bad.qweight)  # refused before anything was derived or reordered


def test_quant_linear_half_precision_and_size():
    lin = torch.nn.Linear(512, 64).half()
    ql = QuantLinear.from_linear(lin, QuantSpec(2, 64))
    assert ql.scales.dtype == torch.float16
    x = torch.randn(3, 512, dtype=torch.float16)
    dense = x.float() @ ql.dequantized_weight().float().t() + lin.bias.float()
    assert rel_err(ql(x), dense) < 2e-3
    packed_bytes = ql.packed.nbytes()
    assert packed_bytes == 512 * 64 // 4 + 8 * 64 * 4


def test_lora_rank_validation():
    with pytest.raises(ValueError, match="lora_rank=-1"):
        FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), QuantSpec(2, 32), lora_rank=-1)


def test_from_linear_rejects_group_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        QuantLinear.from_linear(torch.nn.Linear(96, 8), QuantSpec(2, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_before_quantizing(bad):
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3, 5] = bad
    spec = QuantSpec(bits=2, group_size=64)
    with pytest.raises(ValueError, match=r"non-finite values \(first at index \(3, 5\)"):
        QuantLinear.from_linear(linear, spec)
    with pytest.raises(ValueError, match="non-finite"):
        FakeQuantLinear.from_linear(linear, spec)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_a_negative_or_non_finite_saliency_is_refused(bad):
    fq = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), QuantSpec(bits=2, group_size=64))
    S = torch.rand(8, 64)
    S[1, 2] = bad
    with pytest.raises(ValueError, match=r"S has 1 negative or non-finite values \(first at index \(1, 2\)"):
        fq.set_saliency(S)


def _packed_layer(bits, n=48, k=320, lora=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(bits)
    torch.manual_seed(bits)  # the same layer at every call
    lin = torch.nn.Linear(k, n).to(dtype)
    ql = QuantLinear.from_linear(lin, QuantSpec(bits, 64))
    if lora:
        ql = QuantLinear(ql.packed, ql.bias, torch.randn(4, k, generator=g).to(dtype),
                         torch.randn(n, 4, generator=g).to(dtype), spec=ql.spec)
    return ql


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_linear_on_the_cpu_keeps_the_cpu_word_order(bits):
    """The words are 1-D on the CPU (saliq/word_order.py); the output is the format v1 one, bit for bit."""
    from saliq import cpp_backend as cpp
    ql = _packed_layer(bits, lora=True)
    assert ql.qweight.dim() == 1 and (bits != 3 or ql.qweight_hi.dim() == 1)
    p = ql.packed
    assert p.qweight.shape == (packed_rows(320, plane_widths(bits)[0]), 48)
    for m in (1, 3, 40):  # the GEMV and the prefill
        x = torch.randn(m, 320)
        v1 = cpp.packed_linear(x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, 64, 320, ql.bias, ql.lora_A,
                               ql.lora_B, ql.lora_scale)
        assert torch.equal(ql(x), v1)
    x = torch.randn(2, 320)
    expected = ref.packed_matmul(x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, 64, 320, ql.bias)
    expected = expected + ql.lora_scale * (x @ ql.lora_A.t()) @ ql.lora_B.t()
    with use_backend("ref"):  # a backend that reads format v1 only is handed v1 words
        assert rel_err(ql(x), expected) < 1e-5
    assert torch.equal(ql.dequantized_weight(), ref.dequantize(p.qweight, p.qweight_hi, p.scales, p.zeros, bits,
                                                                  64, 320))


@pytest.mark.parametrize("bits", [2, 3])
def test_state_dict_and_moves_give_format_v1(bits):
    ql = _packed_layer(bits)
    v1 = ql.packed
    sd = ql.state_dict()
    assert torch.equal(sd["qweight"], v1.qweight) and torch.equal(sd["qweight_hi"], v1.qweight_hi)
    assert ql.qweight.dim() == 1  # saving leaves the layer as it was
    x = torch.randn(3, 320)
    y = ql(x)
    # loading into a layer that already keeps the CPU order, and into an empty one
    other = _packed_layer(bits)
    with torch.no_grad():
        other.scales.mul_(2)
    other.load_state_dict(sd)
    assert other.qweight.dim() == 1 and torch.equal(other(x), y)
    fresh = QuantLinear.empty(320, 48, QuantSpec(bits, 64), bias=True, dtype=torch.float32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    # a dtype change on the CPU keeps the order; a move elsewhere hands the other device format v1
    half = _packed_layer(bits).to(torch.bfloat16)
    assert half.qweight.dim() == 1 and torch.equal(half.packed.qweight, v1.qweight)
    meta = _packed_layer(bits).to("meta")
    assert meta.qweight.shape == v1.qweight.shape and meta.qweight_hi.shape == v1.qweight_hi.shape


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pickles_hold_format_v1(bits, tmp_path):
    """torch.save of a whole module and copy.deepcopy carry format v1, as checkpoints do, and come back in the CPU
    word order with the same outputs; a 3-bit layer pickled in an earlier build's CPU order is refused."""
    import copy
    import pickle
    from saliq import word_order
    ql = _packed_layer(bits, lora=True)
    x = torch.randn(3, 320)
    y = ql(x)
    state = ql.__getstate__()
    assert state["_buffers"]["qweight"].dim() == 2 and torch.equal(state["_buffers"]["qweight"], ql.packed.qweight)
    assert word_order.is_cpu_order(ql.qweight)  # pickling leaves the layer as it was
    torch.save(torch.nn.Sequential(ql), tmp_path / "m.pt")
    for back in (torch.load(tmp_path / "m.pt", weights_only=False)[0], copy.deepcopy(ql)):
        assert word_order.is_cpu_order(back.qweight)
        assert torch.equal(back(x), y)
    old = dict(state, _buffers=dict(state["_buffers"], qweight=ql.qweight, qweight_hi=ql.qweight_hi))
    del old[QuantLinear._PICKLED_V1]  # what a build before this format marker pickled
    earlier = QuantLinear.__new__(QuantLinear)
    if bits == 3:
        with pytest.raises(ValueError, match="pickled by an earlier saliq"):
            earlier.__setstate__(old)
    else:  # the 2- and 4-bit CPU order is the one those builds used
        earlier.__setstate__(old)
        assert torch.equal(earlier(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(ql))(x), y)  # plain pickle too
    if torch.cuda.is_available():
        assert copy.deepcopy(ql.cuda()).qweight.dim() == 2  # a layer on the GPU keeps format v1
