"""Format v1: bit-exact round trips, the documented bit positions, and exact dequantization."""
import pytest
import torch

from saliq import packing, ref
from saliq.packing import PackedWeight, pack, pack_weight, unpack
from saliq.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 64), (129, 96), (5, 40), (3, 7)])
def test_round_trip_bit_exact(bits, n, k):
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    qweight, qweight_hi = pack(q, bits)
    assert qweight.dtype == torch.int32 and qweight.shape[1] == n
    assert torch.equal(unpack(qweight, qweight_hi, bits, k), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_documented_bit_positions(bits):
    n, k = 5, 64
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    qweight, qweight_hi = pack(q, bits)
    low_width = 4 if bits == 4 else 2
    per = 32 // low_width
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    for kk in (0, 1, per - 1, per, k - 1):
        for nn_ in (0, n - 1):
            low = (words[kk // per, nn_] >> (low_width * (kk % per))) & ((1 << low_width) - 1)
            value = int(low)
            if bits == 3:
                hi_word = int(qweight_hi[kk // 32, nn_]) & 0xFFFFFFFF
                value |= ((hi_word >> (kk % 32)) & 1) << 2
            assert value == int(q[nn_, kk])


def test_padding_is_zero_and_top_bit_wraps():
    q = torch.full((2, 20), 3, dtype=torch.uint8)  # 20 2-bit values: the second word is partly padding
    qweight, _ = pack(q, 2)
    assert qweight.shape == (2, 2)
    assert int(qweight[0, 0]) == -1  # all 32 bits set: two's complement of 0xFFFFFFFF
    assert int(qweight[1, 0]) == 0xFF  # 4 values of 3 then zero padding


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"2-bit allows \[0, 3\]"):
        pack(torch.tensor([[0, 4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="must hold integers"):
        pack(torch.zeros(2, 16), 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_dequantize_reproduces_fake_quant(bits, group_size):
    n, k = 37, 256
    W = torch.randn(n, k)
    W[:3] = W[:3].abs() + 2.0  # all-positive rows: zero points far below 0
    W[3:6] = -W[3:6].abs() - 2.0  # all-negative rows: zero points above Q
    G = 1 if group_size == -1 else k // group_size
    hi, lo = torch.randn(n, G) + 2, torch.randn(n, G) + 2
    q, s, z = ref.lwc_quantize(W, hi, lo, bits, group_size, False)
    assert (z < 0).any() and (z > 2**bits - 1).any()
    p = pack_weight(q, s, z, QuantSpec(bits, group_size), dtype=torch.float32)
    what, _ = ref.fake_quant_lwc_fwd(W, hi, lo, None, None, bits, group_size, False)
    deq = ref.dequantize(p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k)
    assert torch.equal(deq, what)


def test_packed_weight_validation_names_the_field():
    q = torch.randint(0, 4, (8, 64), dtype=torch.uint8)
    s, z = torch.rand(8, 2), torch.zeros(8, 2)
    p = pack_weight(q, s, z, QuantSpec(2, 32))
    with pytest.raises(ValueError, match=r"scales has shape \(2, 7\)"):
        PackedWeight(p.qweight, p.qweight_hi, p.scales[:, :7], p.zeros, 2, 32, 64, 8)
    with pytest.raises(ValueError, match="zeros must be torch.int16"):
        PackedWeight(p.qweight, p.qweight_hi, p.scales, p.zeros.int(), 2, 32, 64, 8)
    with pytest.raises(ValueError, match="format_version=2"):
        PackedWeight(p.qweight, p.qweight_hi, p.scales, p.zeros, 2, 32, 64, 8, format_version=2)


def test_size_close_to_bits_per_weight():
    n, k = 256, 1024
    q = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    p = pack_weight(q, torch.rand(n, 16), torch.zeros(n, 16), QuantSpec(2, 64), dtype=torch.float16)
    weight_bytes = n * k * 2 / 8
    assert p.nbytes() == weight_bytes + n * 16 * (2 + 2)
    assert packing.packed_rows(k, 2) == k // 16


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(5, 7), (33, 100), (64, 256)])
def test_codes_at_read_the_unpacked_integers(bits, n, k):
    g = torch.Generator().manual_seed(bits * n + k)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    qweight, qweight_hi = pack(q, bits)
    rows = torch.randint(0, n, (200,), generator=g)
    cols = torch.randint(0, k, (200,), generator=g)
    assert torch.equal(packing.codes_at(qweight, qweight_hi, bits, rows, cols), q[rows, cols])
