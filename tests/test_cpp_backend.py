"""The cpp backend (saliq._C on the CPU) against saliq/ref.py and saliq/packing.py.

Random inputs (never zeros), odd shapes, all bit widths and group sizes, fp32/fp16/bf16, every SIMD path
this CPU supports. Tolerance ||out - ref|| / ||ref||: fp32 1e-5, fp16 2e-3, bf16 1e-2; integers exact.
"""
import pytest
import torch

from saliq import backends, packing, ref
from saliq.spec import QuantSpec

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ISA_ORDER = ("portable", "avx2", "avx512")
ISAS = ISA_ORDER[: ISA_ORDER.index(cpp._C.cpu_isa_detected()) + 1]


def rel_err(out, expected):
    out, expected = out.detach().double(), expected.detach().double()
    return float((out - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close_rel(out, expected, tol, what=""):
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten element?)"
    err = rel_err(out, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def poison_heap():
    """Leave NaN-filled freed memory behind, so an output element the kernel never writes shows up as NaN."""
    for n in (1 << 12, 1 << 16, 1 << 20):
        torch.full((n,), float("nan"))


@pytest.fixture(params=ISAS)
def isa(request):
    previous = cpp.cpu_isa()
    cpp.set_cpu_isa(request.param)
    yield request.param
    cpp.set_cpu_isa(previous)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_packed(n, k, bits, group_size, dtype, seed=0):
    g = gen(seed)
    spec = QuantSpec(bits=bits, group_size=group_size)
    groups = spec.num_groups(k)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) + 0.5) * 0.02
    zeros = torch.randint(-3, (1 << bits) + 3, (n, groups), generator=g)  # some outside [0, Q]
    return packing.pack_weight(q, scales, zeros.float(), spec, dtype=dtype)


# ---------------------------------------------------------------- registration
def test_cpp_backend_registered_for_cpu():
    for op in backends.OPS:
        assert "cpp" in backends.available(op, "cpu"), op
    x = torch.randn(1, 64)
    assert backends.resolve("packed_matmul", "cpu", x, 2, 64, 64) is cpp.packed_matmul


# ---------------------------------------------------------------- pack / unpack / dequantize
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(37, 100), (129, 64), (5, 33), (16, 1)])
def test_pack_unpack_bit_exact(bits, n, k):
    q = torch.randint(0, 1 << bits, (n, k), generator=gen(n * k + bits))
    expected = packing.pack(q, bits)
    got = cpp.pack(q, bits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[1].dtype == torch.int32 and got[1].shape == expected[1].shape
    assert torch.equal(cpp.unpack(*expected, bits, k), packing.unpack(*expected, bits, k))
    assert torch.equal(cpp.pack(q.to(torch.int16), bits)[0], expected[0])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="2-bit allows"):
        cpp.pack(torch.tensor([[0, 4]]), 2)
    with pytest.raises(ValueError, match="integers"):
        cpp.pack(torch.zeros(2, 2), 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 192), (128, 256), (-1, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_ref(bits, group_size, k, dtype):
    p = random_packed(37, k, bits, group_size, dtype, seed=bits + k)
    args = (p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k)
    poison_heap()
    got = cpp.dequantize(*args)
    assert got.dtype == dtype
    assert torch.equal(got, ref.dequantize(*args))


# ---------------------------------------------------------------- packed_matmul
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 192), (128, 256), (-1, 100)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
def test_packed_matmul_fp32_all_paths(isa, bits, group_size, k, m):
    n = 203  # 3 LUT blocks of 64 + a tail of 11 columns
    p = random_packed(n, k, bits, group_size, torch.float32, seed=m * 7 + bits)
    x = torch.randn(m, k, generator=gen(m))
    bias = torch.randn(n, generator=gen(5)) if m % 2 else None
    args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, bias)
    poison_heap()
    assert_close_rel(cpp.packed_matmul(*args), ref.packed_matmul(*args), TOL[torch.float32], f"{isa} m={m}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 8, 33])
def test_packed_matmul_half_dtypes(bits, dtype, m):
    k, n, group_size = 320, 129, 64
    p = random_packed(n, k, bits, group_size, dtype, seed=bits)
    x = torch.randn(m, k, generator=gen(m + 1)).to(dtype)
    bias = torch.randn(n, generator=gen(3)).to(dtype)
    args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, bias)
    poison_heap()
    assert_close_rel(cpp.packed_matmul(*args), ref.packed_matmul(*args), TOL[dtype], f"{dtype} m={m}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (128, 256), (-1, 100)])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_packed_matmul_bf16_all_paths(isa, bits, group_size, k, m):
    """bf16 activations take the vdpbf16ps path on CPUs with AVX512_BF16 (M > 4 or 4-bit)."""
    n = 203
    p = random_packed(n, k, bits, group_size, torch.bfloat16, seed=m + bits)
    x = torch.randn(m, k, generator=gen(m + 2)).to(torch.bfloat16)
    args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, None)
    poison_heap()
    out = cpp.packed_matmul(*args)
    assert_close_rel(out, ref.packed_matmul(*args), TOL[torch.bfloat16], f"{isa} m={m}")
    exact = ref.packed_matmul(x.float(), *args[1:]).to(torch.float32)
    assert rel_err(out.float(), exact) < 5e-3  # the bf16 output rounding dominates


def test_packed_matmul_empty_rows_and_through_ops():
    from saliq import ops

    p = random_packed(64, 128, 2, 64, torch.float32)
    y = cpp.packed_matmul(torch.randn(0, 128), p.qweight, p.qweight_hi, p.scales, p.zeros, 2, 64, 128, None)
    assert y.shape == (0, 64)
    x = torch.randn(2, 3, 128, requires_grad=True)
    with backends.use_backend("cpp"):
        y = ops.packed_linear(x, p)
        y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    with backends.use_backend("ref"):
        y_ref = ops.packed_linear(x_ref, p)
        y_ref.square().sum().backward()
    assert_close_rel(y, y_ref, 1e-5, "y")
    assert_close_rel(x.grad, x_ref.grad, 1e-5, "dx")


# ---------------------------------------------------------------- fake_quant_lwc
def fq_inputs(n, k, group_size, dtype, with_s, with_delta, seed, ties=False):
    g = gen(seed)
    W = torch.randn(n, k, generator=g)
    if ties:  # few distinct values: several elements share each group's max / min
        W = (W * 2).round() / 2
    groups = k // (k if group_size == -1 else group_size)
    hi = torch.randn(n, groups, generator=g) * 2 + 2
    lo = torch.randn(n, groups, generator=g) * 2 + 2
    S = torch.rand(n, k, generator=g).add_(0.1).to(dtype) if with_s else None
    delta = (torch.randn(n, k, generator=g) * 0.01).to(dtype) if with_delta else None
    return W.to(dtype), hi, lo, S, delta


FQ_CASES = [(2, 32, 96), (3, 64, 192), (4, 128, 256), (2, -1, 100), (3, -1, 37), (4, 32, 64)]


@pytest.mark.parametrize("bits,group_size,k", FQ_CASES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("saliency", ["none", "S", "S+delta"])
def test_fake_quant_fwd_bwd_match_ref(bits, group_size, k, symmetric, dtype, saliency):
    n = 37
    W, hi, lo, S, delta = fq_inputs(n, k, group_size, dtype, saliency != "none", saliency == "S+delta",
                                   seed=bits * 100 + k)
    tol = TOL[dtype]
    poison_heap()
    what, reg = cpp.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    what_ref, reg_ref = ref.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    assert_close_rel(what, what_ref, tol, "What")
    if S is None:
        assert reg.dtype == torch.float32 and float(reg) == 0.0
    else:
        assert_close_rel(reg, reg_ref, 1e-5, "reg")

    grad_what = torch.randn(n, k, generator=gen(9)).to(dtype)
    grad_reg = torch.tensor(0.7)
    for need_dW in (False, True):
        poison_heap()
        got = cpp.fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)
        exp = ref.fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)
        for name, a, b in zip(("dW", "dhi", "dlo", "ddelta"), got, exp):
            if b is None:
                assert a is None, name
            else:
                assert_close_rel(a, b, max(tol, 1e-5), name)


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_dW_with_ties(symmetric):
    W, hi, lo, S, delta = fq_inputs(29, 128, 32, torch.float32, True, True, seed=4, ties=True)
    grad_what = torch.randn(29, 128, generator=gen(1))
    args = (grad_what, torch.tensor(1.3), W, hi, lo, S, delta, 2, 32, symmetric, True)
    got, exp = cpp.fake_quant_lwc_bwd(*args), ref.fake_quant_lwc_bwd(*args)
    for name, a, b in zip(("dW", "dhi", "dlo", "ddelta"), got, exp):
        assert_close_rel(a, b, 1e-5, name)


def test_fake_quant_autograd_through_ops_matches_ref():
    from saliq import ops

    spec = QuantSpec(bits=3, group_size=64)
    W0, hi0, lo0, S, delta0 = fq_inputs(45, 192, 64, torch.float32, True, True, seed=11)
    results = {}
    for name in ("cpp", "ref"):
        W, hi, lo, delta = (t.clone().requires_grad_(True) for t in (W0, hi0, lo0, delta0))
        with backends.use_backend(name):
            what, reg = ops.fake_quant_lwc(W, hi, lo, spec, S=S, delta=delta)
            (what.sin().sum() + 0.3 * reg).backward()
        results[name] = (what, reg, W.grad, hi.grad, lo.grad, delta.grad)
    for label, a, b in zip(("What", "reg", "dW", "dhi", "dlo", "ddelta"), results["cpp"], results["ref"]):
        assert_close_rel(a.detach(), b.detach(), 1e-5, label)


# ---------------------------------------------------------------- saliency_sq_error
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_s", [False, True])
@pytest.mark.parametrize("shape", [(37, 129), (3, 5, 7), (50001,)])
def test_saliency_sq_error_matches_ref(dtype, with_s, shape):
    g = gen(len(shape))
    A, B = torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    S = torch.rand(*shape, generator=g).to(dtype) if with_s else None
    poison_heap()
    loss, grad = cpp.saliency_sq_error(A, B, S, True)
    loss_ref, grad_ref = ref.saliency_sq_error(A, B, S, True)
    assert_close_rel(loss, loss_ref, 1e-5, "loss")
    assert_close_rel(grad, grad_ref, TOL[dtype], "grad")
    assert cpp.saliency_sq_error(A, B, S, False)[1] is None


def test_reductions_do_not_depend_on_thread_count():
    A, B, S = (torch.randn(300_001, generator=gen(i)) for i in range(3))
    W, hi, lo, S2, _ = fq_inputs(301, 256, 64, torch.float32, True, False, seed=2)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            outs.append((cpp.saliency_sq_error(A, B, S, False)[0],
                         cpp.fake_quant_lwc_fwd(W, hi, lo, S2, None, 2, 64, False)[1]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
