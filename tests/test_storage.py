"""Storage forms of checkpoint format 2: the smallest exact form for every tensor, 16-bit floats unless asked."""
import pytest
import torch

from saliq import storage


@pytest.mark.parametrize("groups", [1, 4, 7])
def test_zero_points_in_0_to_15_go_two_per_byte_and_come_back(groups):
    z = torch.randint(0, 16, (groups, 5), dtype=torch.int16)
    packed = storage.stored_form("l.zeros", z)
    assert packed.dtype == torch.uint8 and packed.shape == ((groups + 1) // 2, 5)
    assert torch.equal(storage.unpack_nibbles(packed, groups), z)
    assert storage.zeros_storage_name(packed) == "uint4"


def test_zero_points_fit_int8_or_stay_int16():
    z = torch.tensor([[0, 3, -128, 127]], dtype=torch.int16)
    assert storage.stored_form("l.zeros", z).dtype == torch.int8
    assert storage.stored_form("l.zeros", torch.tensor([[0, 16]], dtype=torch.int16)).dtype == torch.int8
    wide = torch.tensor([[0, 300]], dtype=torch.int16)  # LWC zero points may leave [0, Q] far
    assert storage.stored_form("l.zeros", wide).dtype == torch.int16


def test_scales_go_to_fp16_only_when_exact():
    s = torch.tensor([0.5, 0.015625, 2.0**-20])
    assert storage.stored_form("l.scales", s).dtype == torch.float16
    assert torch.equal(storage.stored_form("l.scales", s).float(), s)
    inexact = torch.tensor([0.1, 0.2])
    assert storage.stored_form("l.scales", inexact).dtype == torch.float32


@pytest.mark.parametrize("float_bits", [16, 32])
def test_float_tensors_in_16_bits_unless_asked(float_bits):
    emb = torch.randn(10, 4)
    out = storage.stored_form("model.embed_tokens.weight", emb, float_bits)
    assert out.dtype == (torch.float16 if float_bits == 16 else torch.float32)
    big = torch.tensor([1e6, -3.0])  # beyond fp16: bf16 keeps the range
    assert storage.stored_form("norm.weight", big, float_bits).dtype == (
        torch.bfloat16 if float_bits == 16 else torch.float32)
    codes = torch.zeros(3, 4, dtype=torch.int32)
    assert storage.stored_form("l.qweight", codes, float_bits) is codes
    with pytest.raises(ValueError, match="float_bits=8"):
        storage.stored_form("x", emb, 8)


def test_round_model_to_makes_the_model_hold_the_stored_values():
    lin = torch.nn.Linear(8, 4)
    stored = storage.stored_state(dict(lin.state_dict()))
    storage.round_model_to(lin, stored)
    assert lin.weight.dtype == torch.float32
    assert torch.equal(lin.weight, stored["weight"].float())


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True)])
def test_scales_rounded_to_fp16_first_then_codes_fitted_to_them(bits, symmetric):
    from saliq import ref

    torch.manual_seed(bits)
    W = torch.randn(16, 128) * 0.05
    hi, lo = torch.rand(16, 2) * 4, torch.rand(16, 2) * 4
    q, s, z = ref.lwc_quantize(W, hi, lo, bits, 64, symmetric, scale_dtype=torch.float16)
    assert torch.equal(s.half().float(), s)  # stored exactly in fp16
    q32, s32, z32 = ref.lwc_quantize(W, hi, lo, bits, 64, symmetric)
    assert not torch.equal(s, s32) and torch.allclose(s, s32, rtol=2**-11)
    # the codes are the rounding of W against the rounded scale (not the fp32 one)
    Wg = W.reshape(16, 2, 64)
    want = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, (1 << bits) - 1).reshape(16, 128)
    assert torch.equal(q, want.long())
