"""The CPU word order (saliq/word_order.py, csrc/cpu/word_order.h, docs/FORMAT.md).

The conversion is checked against the formula word by word; every C++ kernel that reads the words (each GEMV form
under each ISA cap, exact and int8, the prefill dequantizer, unpack, dequantize) must give bit for bit what it gives
on the same weight in format v1, which test_cpp_backend / test_cpp_decode check against saliq/ref.py.
"""
import pytest
import torch

from saliq import cpp_backend as cpp
from saliq import ref, word_order
from saliq.packing import packed_rows, plane_widths

from test_cpp_backend import gen, poison_heap, random_packed
from test_cpp_decode import ISAS as INT8_ISAS

CAPS = ["portable"] + INT8_ISAS if INT8_ISAS else ["portable"]


@pytest.fixture(params=CAPS)
def isa(request):
    previous = cpp.cpu_isa()
    cpp.set_cpu_isa(request.param)
    yield request.param
    cpp.set_cpu_isa(previous)


@pytest.fixture(params=["auto", "exact"])
def gemv(request):
    previous = cpp.cpu_gemv()
    cpp.set_cpu_gemv(request.param)
    yield request.param
    cpp.set_cpu_gemv(previous)


def formula_index(r, n, rows, N, band):
    b0 = r // band * band
    h = min(band, rows - b0)
    n0 = n // 16 * 16
    w = min(16, N - n0)
    return b0 * N + n0 * h + (r - b0) * w + (n - n0)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("k,n", [(64, 16), (576, 40), (1040, 37), (100, 5), (4100, 33), (32, 1)])
def test_conversion_follows_the_formula_and_round_trips(width, k, n):
    rows = packed_rows(k, width)
    words = torch.randint(-2**31, 2**31 - 1, (rows, n), generator=gen(k + n + width), dtype=torch.int64)
    words = words.to(torch.int32)
    flat = word_order.plane_to_cpu_order(words, width)
    assert flat.shape == (rows * n,)
    band = word_order.band_rows(width)
    index = torch.tensor([[formula_index(r, c, rows, n, band) for c in range(n)] for r in range(rows)])
    assert torch.equal(flat[index], words)
    assert torch.equal(word_order.plane_to_v1(flat, width, k, n), words)


def cpu_layout_codes(lo, hi, k, n):
    """The codes of 3-bit planes in the CPU word order, read by docs/FORMAT.md's formula (word by word, plain Python):
    input 16 r + 4 b + j of column c from byte b of word (r, c) and nibble b of the row's 16 hi bits."""
    lo_rows, hi_rows = packed_rows(k, 2), packed_rows(k, 1)
    codes = torch.zeros(n, lo_rows * 16, dtype=torch.int64)
    for r in range(lo_rows):
        for c in range(n):
            w = int(lo[formula_index(r, c, lo_rows, n, 4)]) & 0xFFFFFFFF
            h = (int(hi[formula_index(r // 2, c, hi_rows, n, 2)]) & 0xFFFFFFFF) >> (16 * (r % 2)) & 0xFFFF
            for b in range(4):
                byte, nibble = w >> (8 * b) & 0xFF, h >> (4 * b) & 0xF
                row = (byte & 7, byte >> 3 & 7, nibble & 7, (byte >> 6) | (nibble >> 1 & 4))
                for j in range(4):
                    codes[c, 16 * r + 4 * b + j] = row[j]
    return codes


@pytest.mark.parametrize("k,n", [(64, 16), (48, 5), (208, 19), (16, 3)])
def test_3bit_codes_follow_the_formula_and_round_trip(k, n):
    q = torch.randint(0, 8, (n, k), generator=gen(k * n))
    qw, qh = cpp.pack(q, 3)
    lo, hi = word_order.to_cpu_order(qw, qh, 3)
    codes = cpu_layout_codes(lo, hi, k, n)
    assert torch.equal(codes[:, :k], q) and not codes[:, k:].any()
    assert all(torch.equal(a, b) for a, b in zip(word_order.to_v1(lo, hi, 3, k, n), (qw, qh)))
    meta = word_order.to_cpu_order(qw.to("meta"), qh.to("meta"), 3)  # a layer built on the meta device
    assert [t.shape for t in meta] == [lo.shape, hi.shape]


@pytest.mark.parametrize("k,n", [(64, 16), (48, 5), (1040, 37), (16, 3)])
def test_3bit_repack_in_cpp_matches_torch(k, n):
    """The C++ re-pack (the CPU, when built) and the torch one (any device) give the same words, both ways."""
    words = torch.randint(-2**31, 2**31 - 1, (packed_rows(k, 2) + packed_rows(k, 1), n), generator=gen(k + n))
    lo, hi = words.to(torch.int32).split([packed_rows(k, 2), packed_rows(k, 1)])
    for into_cpu_layout in (True, False):
        expected = word_order._repack3_torch(lo.contiguous(), hi.contiguous(), into_cpu_layout)
        got = cpp._C.repack3(lo.contiguous(), hi.contiguous(), into_cpu_layout)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), into_cpu_layout
    with pytest.raises(ValueError, match=r"hi must be a 2-D int32 CPU tensor \[2, 16\]"):
        cpp._C.repack3(torch.zeros(4, 16, dtype=torch.int32), torch.zeros(3, 16, dtype=torch.int32), True)


def test_conversion_in_chunks_of_bands(monkeypatch):
    """Long planes convert a run of bands at a time: the runs' seams land on band edges."""
    monkeypatch.setattr(word_order, "_CHUNK_WORDS", 3 * 4 * 48)
    k, n = 64 * 10 + 16, 48
    q = torch.randint(0, 4, (n, k), generator=gen(3))
    qw, qh = cpp.pack(q, 3)
    lo, hi = word_order.to_cpu_order(qw, qh, 3)
    assert torch.equal(cpp.unpack(lo, hi, 3, k), q.to(torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(word_order.to_v1(lo, hi, 3, k, n), (qw, qh)))


def test_malformed_cpu_order_planes_are_refused():
    with pytest.raises(ValueError, match=r"1-D with 8 x 5 = 40 words"):
        word_order.plane_to_v1(torch.zeros(41, dtype=torch.int32), 2, 128, 5)
    p = random_packed(32, 128, 3, 64, torch.float32)
    lo, hi = word_order.to_cpu_order(p.qweight, p.qweight_hi, 3)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="CPU word order has 255 words"):
        cpp.packed_matmul(x, lo[:-1], hi, p.scales, p.zeros, 3, 64, 128, None)
    with pytest.raises(ValueError, match=r"qweight_hi must be int32 \[128\] \(the CPU word order"):
        cpp.packed_matmul(x, lo, p.qweight_hi, p.scales, p.zeros, 3, 64, 128, None)
    with pytest.raises(ValueError, match=r"qweight_hi must be in the CPU word order \(1-D\) as qweight is"):
        cpp.unpack(lo, p.qweight_hi, 3, 128)


SHAPES = [(64, 128, 64), (48, 320, 64), (37, 96, 32), (130, 256, 128), (40, 100, -1), (33, 4100, -1)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group_size", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_same_bits_in_either_order(isa, gemv, bits, n, k, group_size, m, dtype):
    p = random_packed(n, k, bits, group_size, dtype, seed=n + k + m)
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    bias = torch.randn(n, generator=gen(7)).to(dtype) if m % 2 else None
    lo, hi = word_order.to_cpu_order(p.qweight, p.qweight_hi, bits)
    rest = (p.scales, p.zeros, bits, group_size, k, bias)
    poison_heap()
    v1 = cpp.packed_matmul(x, p.qweight, p.qweight_hi, *rest)
    poison_heap()
    cpu = cpp.packed_matmul(x, lo, hi, *rest)
    assert not cpu.isnan().any()
    assert torch.equal(cpu, v1), f"{isa} {gemv} max diff {(cpu.float() - v1.float()).abs().max()}"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_unpack_and_dequantize_read_the_cpu_order(bits, n, k, group_size):
    p = random_packed(n, k, bits, group_size, torch.float16, seed=k)
    lo, hi = word_order.to_cpu_order(p.qweight, p.qweight_hi, bits)
    assert torch.equal(cpp.unpack(lo, hi, bits, k), cpp.unpack(p.qweight, p.qweight_hi, bits, k))
    expected = ref.dequantize(p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k)
    assert torch.equal(cpp.dequantize(lo, hi, p.scales, p.zeros, bits, group_size, k), expected)


def test_planes_of_every_width_have_their_band():
    assert [word_order.band_rows(w) for w in (1, 2, 4)] == [2, 4, 8]
    assert plane_widths(3) == (2, 1)


@pytest.mark.parametrize("tile", ["40", "24", "0"])
def test_prefill_tiles_that_cut_strips(monkeypatch, tile):
    """Prefill tiles of any height (SALIQ_CPU_PREFILL_TILE; 0: the whole weight) may start inside a strip of 16."""
    monkeypatch.setenv("SALIQ_CPU_PREFILL_TILE", tile)
    for bits in (2, 3, 4):
        p = random_packed(75, 256, bits, 64, torch.bfloat16, seed=bits)
        lo, hi = word_order.to_cpu_order(p.qweight, p.qweight_hi, bits)
        x = torch.randn(48, 256, generator=gen(bits)).bfloat16()
        rest = (p.scales, p.zeros, bits, 64, 256, None)
        assert torch.equal(cpp.packed_matmul(x, lo, hi, *rest), cpp.packed_matmul(x, p.qweight, p.qweight_hi, *rest))
