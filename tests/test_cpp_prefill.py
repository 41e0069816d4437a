"""The CPU prefill path (M above the GEMV crossover: dequantized tiles of W^T + at::mm) against saliq/ref.py.

Contract (docs/OPS.md): bf16 / fp16 x on a CPU that multiplies that dtype natively (SALIQ_CPU_PREFILL=auto), or
always (=half): W is dequantized as ref.dequantize does, (q - z) * s in fp32, rounded once to x's dtype, and
multiplied in that dtype with fp32 sums; otherwise (=fp32, fp32 x, or no native support) fp32 tiles, exact up to
fp32 rounding. Tolerances ||out - ref|| / ||ref||: fp32 1e-5, fp16 2e-3, bf16 1e-2. Outputs are written into
memory left NaN-filled (poison_heap), so an element no tile writes shows up.
"""
import pytest
import torch
import torch.nn.functional as F

from saliq import ref
from saliq import cpp_backend as cpp

from test_cpp_backend import ISAS, TOL, assert_close_rel, gen, poison_heap, random_packed, rel_err

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def prefill(monkeypatch):
    """Sets SALIQ_CPU_PREFILL (GEMM dtype) and SALIQ_CPU_PREFILL_TILE (columns per tile, 0 = whole weight)."""
    def use(mode="auto", tile=None):
        monkeypatch.setenv("SALIQ_CPU_PREFILL", mode)
        if tile is None:
            monkeypatch.delenv("SALIQ_CPU_PREFILL_TILE", raising=False)
        else:
            monkeypatch.setenv("SALIQ_CPU_PREFILL_TILE", str(tile))
    return use


@pytest.fixture
def isa():
    previous = cpp.cpu_isa()

    def use(name):
        cpp.set_cpu_isa(name)

    yield use
    cpp.set_cpu_isa(previous)


def case(n, k, bits, group_size, dtype, m, seed, bias=True):
    p = random_packed(n, k, bits, group_size, dtype, seed=seed)
    x = torch.randn(m, k, generator=gen(seed + 1)).to(dtype)
    b = torch.randn(n, generator=gen(seed + 2)).to(dtype) if bias else None
    return (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, b)


def rounded_weight_linear(args):
    """F.linear on W dequantized in fp32 and rounded once to x's dtype: what the half-dtype GEMM computes."""
    x, qw, qh, s, z, bits, gs, k, b = args
    W = ref.dequantize(qw, qh, s.float(), z, bits, gs, k).to(x.dtype)
    return F.linear(x, W, None if b is None else b.to(x.dtype))


def run(args):
    poison_heap()
    return cpp.packed_matmul(*args)


# K = 100 per channel: the last 2-bit, 4-bit and hi-plane words are partial
SHAPES = [(32, 96), (64, 320), (-1, 100)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", SHAPES)
@pytest.mark.parametrize("m", [33, 64, 100, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_prefill_matches_ref(prefill, bits, group_size, k, m, dtype):
    prefill("auto")
    n = 203  # one full tile of 128 and a tail of 75 (not a multiple of 16)
    args = case(n, k, bits, group_size, dtype, m, seed=bits * 1000 + m + k, bias=m % 2 == 1)
    out = run(args)
    assert_close_rel(out, ref.packed_matmul(*args), TOL[dtype], f"{dtype} m={m}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", SHAPES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_gemm_rounds_the_weight_once(prefill, bits, group_size, k, dtype):
    """Forced half GEMM: within tolerance of ref, and much closer to F.linear on the once-rounded weight than to
    ref (a dequantizer that rounded differently, or twice, would be as far from both)."""
    prefill("half")
    args = case(203, k, bits, group_size, dtype, 64, seed=bits + k)
    out = run(args)
    expected = ref.packed_matmul(*args)
    assert_close_rel(out, expected, TOL[dtype], f"{dtype}")
    err_ref = rel_err(out, expected)
    assert err_ref > 1e-5  # the weight was rounded: the path did run in the half dtype
    assert rel_err(out, rounded_weight_linear(args)) < 0.25 * err_ref


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp32_gemm_is_exact_for_every_dtype(prefill, bits, dtype):
    prefill("fp32")
    args = case(203, 320, bits, 64, dtype, 64, seed=7 + bits)
    out = run(args)
    # fp32 sums, one rounding to x's dtype at the end: far below what rounding W to fp16 / bf16 costs
    assert rel_err(out, ref.packed_matmul(*args)) < (1e-5 if dtype == torch.float32 else 5e-5)


@pytest.mark.parametrize("mode", ["half", "fp32"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(64, 320), (-1, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_isa_dequantizes_to_the_same_bits(prefill, isa, mode, bits, group_size, k, dtype):
    """The AVX-512 dequantizer and the portable loops (capped ISA) give identical weights, so identical outputs.
    Groups of 64 take the AVX-512 loop's runs of 32 inputs; K = 100 per channel its 16 at a time, the last masked."""
    prefill(mode)
    args = case(203, k, bits, group_size, dtype, 40, seed=bits)
    outs = {}
    for name in ISAS:
        isa(name)
        outs[name] = run(args)
    for name in ISAS:
        assert torch.equal(outs[name], outs[ISAS[0]]), f"{name} vs {ISAS[0]}"


@pytest.mark.parametrize("tile", [0, 16, 40, 128, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_widths_cover_every_column(prefill, tile, dtype):
    """Whole weight (0), narrow tiles, tiles with a masked tail (40), one tile for all (1000); N = 600."""
    prefill("half", tile)
    args = case(600, 192, 3, 32, dtype, 48, seed=tile)
    assert_close_rel(run(args), ref.packed_matmul(*args), TOL[dtype], f"tile={tile}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [192, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_shared_evenly_cover_every_column(prefill, threads, n, dtype):
    """The default tiles come in a multiple of the thread count (600 rows on 2 or 3 threads: 5 tiles of 112 and
    one of 40; 192 on 2: two of 96): every column is written whatever the split."""
    prefill("auto")
    args = case(n, 192, 3, 64, dtype, 40, seed=n + threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = run(args)
    finally:
        torch.set_num_threads(before)
    assert_close_rel(out, ref.packed_matmul(*args), TOL[dtype], f"threads={threads}")


@pytest.mark.parametrize("m", [33, 64, 257])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_linear_with_lora(prefill, m, lora_dtype, dtype):
    prefill("auto")
    x, qw, qh, s, z, bits, gs, k, b = case(203, 320, 3, 64, dtype, m, seed=m)
    A = (torch.randn(8, k, generator=gen(m + 5)) * 0.1).to(lora_dtype)
    B = (torch.randn(203, 8, generator=gen(m + 6)) * 0.1).to(lora_dtype)
    poison_heap()
    out = cpp.packed_linear(x, qw, qh, s, z, bits, gs, k, b, A, B, 0.5)
    from saliq.packing import PackedWeight

    packed = PackedWeight(qweight=qw, qweight_hi=qh, scales=s, zeros=z, bits=bits, group_size=gs, in_features=k,
                          out_features=203)
    expected = ref.packed_linear(x, packed, b, A, B, 0.5)
    assert_close_rel(out, expected, TOL[dtype], f"{dtype} lora {lora_dtype} m={m}")


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad_enabled"])
@pytest.mark.parametrize("tile", [None, 0])
def test_grad_and_inference_modes(prefill, mode, tile):
    """Tiles are written from worker threads (inference mode and grad mode are thread-local); the whole-weight
    buffer is kept across calls made in and out of inference mode."""
    prefill("auto", tile)
    args = list(case(600, 256, 2, 64, torch.bfloat16, 64, seed=3))
    expected = ref.packed_matmul(*args)
    for _ in range(2):
        if mode == "inference_mode":
            with torch.inference_mode():
                out = run(args)
        elif mode == "no_grad":
            with torch.no_grad():
                out = run(args)
        else:
            args[0] = args[0].clone().requires_grad_()
            out = run(args)
        assert_close_rel(out.detach(), expected, TOL[torch.bfloat16], mode)


def test_non_finite_activations_propagate(prefill):
    prefill("auto")
    args = list(case(203, 128, 2, 64, torch.bfloat16, 40, seed=9, bias=False))
    args[0] = args[0].clone()
    args[0][3, 5] = float("nan")
    out = run(args)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[torch.arange(40) != 3]).all()


def test_bad_setting_is_refused(prefill):
    prefill("int8")
    with pytest.raises(ValueError, match="SALIQ_CPU_PREFILL"):
        cpp.packed_matmul(*case(64, 64, 2, 64, torch.float32, 40, seed=1))
