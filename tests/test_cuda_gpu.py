"""The cuda backend (hand-written CUDA kernels in saliq._C) against saliq/ref.py on a GPU."""
import pytest
import torch

from saliq import packing, ref
from saliq.spec import QuantSpec

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cpp.WITH_CUDA, reason="saliq._C was built without CUDA"),
]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close_rel(out, expected, tol, what=""):
    assert out.shape == expected.shape and out.dtype == expected.dtype, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten element?)"
    err = float((out.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def poison():
    """Fill the caching allocator's free blocks with NaN, so unwritten output elements show up."""
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 22):
        torch.full((n,), float("nan"), device="cuda")


def random_packed(n, k, bits, group_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group_size)
    groups = spec.num_groups(k)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) + 0.5) * 0.02
    zeros = torch.randint(-3, (1 << bits) + 3, (n, groups), generator=g).float()
    p = packing.pack_weight(q, scales, zeros, spec, dtype=dtype)
    return {k_: v.cuda() for k_, v in p.tensors().items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (32, 128), (64, 4096), (128, 256), (-1, 100), (-1, 64)])
@pytest.mark.parametrize("n", [37, 256, 4096])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_gemv_matches_ref(bits, group_size, k, n, m, dtype):
    """fp16 / bf16: the tensor-core decode kernel (M <= 16; whole and ragged shapes, groups of 32 that split its
    64-k steps, per-channel); fp32: the fp32 GEMV (M <= 8)."""
    if dtype == torch.float32 and m > cpp.CUDA_GEMV_MAX_M:
        pytest.skip("the fp32 GEMV serves M <= 8")
    p = random_packed(n, k, bits, group_size, dtype, seed=bits + n)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if m != 3 else None
    args = (x, p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], bits, group_size, k, bias)
    poison()
    out = cpp.cuda_packed_matmul(*args)
    assert_close_rel(out, ref.packed_matmul(*args), TOL[dtype], "y")
    assert torch.equal(out, cpp.cuda_packed_matmul(*args)), "not deterministic"


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group_size", [(37, 100, -1), (256, 4096, 64), (4096, 1024, 32)])
def test_decode_kernel_adds_the_reserved_weights(bits, m, dtype, n, k, group_size):
    """x Sp^T in the decode kernel's launch (a warp per output, lanes over the row's nonzeros): rows with no,
    few and hundreds of nonzeros, against ref.packed_matmul then ref.sparse_addmm; then with a LoRA term too."""
    g = torch.Generator().manual_seed(bits * 100 + m + n)
    counts = torch.randint(0, 12, (n,), generator=g)
    counts[::5] = 0
    counts[n // 2] = min(k, 700)  # more nonzeros than a warp has lanes, many times over
    cols = torch.cat([torch.randperm(k, generator=g)[:c].sort().values for c in counts.tolist()]).int()
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    vals = torch.randn(cols.numel(), generator=g) * 0.1
    rowptr, cols, vals = rowptr.cuda(), cols.cuda(), vals.cuda()
    p = random_packed(n, k, bits, group_size, dtype, seed=bits + n)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    args = (x, p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], bits, group_size, k, bias)
    poison()
    csr = dict(rowptr=rowptr, cols=cols, vals=vals)
    out = cpp.cuda_packed_matmul.with_extras(*args, **csr)
    dense_part = ref.packed_matmul(x.float(), *args[1:3], args[3].float(), *args[4:8], bias.float())
    expected = ref.sparse_addmm(dense_part, x, rowptr, cols, vals).to(dtype)
    assert_close_rel(out, expected, TOL[dtype], "y")
    assert torch.equal(cpp.cuda_packed_matmul.with_extras(*args, **csr), out)  # deterministic
    assert cpp.cuda_packed_matmul.with_extras(x.float(), *args[1:], **csr) is None  # fp32: not served
    # with a LoRA term of rank 40 (lanes over r, some idle) as well
    A, B = torch.randn(40, k, device="cuda").to(dtype) * 0.05, torch.randn(n, 40, device="cuda").to(dtype) * 0.05
    out = cpp.cuda_packed_matmul.with_extras(*args, A, B, 0.5, **csr)
    t = (x @ A.t()).float()  # rounded to x's dtype, as the kernel receives it
    assert_close_rel(out, (expected.float() + 0.5 * t @ B.float().t()).to(dtype), TOL[dtype], "y with LoRA")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_linear_with_reserved_weights_on_the_gpu(lora, dtype):
    """A QuantLinear with reserved weights on CUDA (the decode kernel adds them and the LoRA term in its launch for
    M <= 16; larger M adds them after the Triton matmul) gives the layer's dense weight's output."""
    from saliq import outliers
    from saliq.nn import FakeQuantLinear

    torch.manual_seed(4)
    spec = QuantSpec(2, 64)
    fq = FakeQuantLinear(torch.randn(300, 512) * 0.1, torch.randn(300), spec, lora_rank=8 if lora else 0)
    if lora:
        with torch.no_grad():
            fq.lora_B.normal_(0, 0.05)
    fq.reserve(outliers.select(fq.weight, None, spec, 0.01, "magnitude"))
    ql = fq.to_quant_linear().cuda().to(dtype)  # the corrections stay fp32 (QuantLinear._apply)
    assert ql.reserved > 0
    W = ql.dequantized_weight().float()
    for m in (1, 7, 16, 40):
        x = torch.randn(m, 512, device="cuda").to(dtype)
        want = x.float() @ W.t() + ql.bias.float()
        if lora:
            want = want + ql.lora_scale * (x.float() @ ql.lora_A.float().t()) @ ql.lora_B.float().t()
        with torch.no_grad():
            assert_close_rel(ql(x), want.to(dtype), TOL[dtype], f"M={m}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 4096), (128, 256), (-1, 100), (-1, 37), (-1, 64)])
@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bit_identical_to_ref(bits, group_size, k, n, dtype):
    """The CUDA dequantize kernel: whole words (16-byte stores) and ragged ones (per-channel K not a multiple of
    the codes per word), in scales.dtype and into every other dtype."""
    p = random_packed(n, k, bits, group_size, dtype, seed=bits * 7 + n + k)
    args = (p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], bits, group_size, k)
    poison()
    assert torch.equal(cpp.cuda_dequantize(*args), ref.dequantize(*args))
    for out_dtype in DTYPES:  # the prefill path writes W in the activation dtype: one rounding from fp32
        out = torch.full((n, k), float("nan"), device="cuda", dtype=out_dtype)
        assert cpp.cuda_dequantize_into(out, *args) is out
        expected = ref.dequantize(p["qweight"], p["qweight_hi"], p["scales"].float(), p["zeros"], bits, group_size,
                                  k).to(out_dtype)
        assert torch.equal(out, expected), out_dtype


def test_dequantize_joins_the_prefill_tuning():
    # dequantize_into offers the CUDA kernel as a candidate (first: no compilation); whichever wins, the prefill
    # output is the one ref gives
    from saliq.kernels import dequantize as tdq

    assert tdq._cuda_kernel() is cpp.cuda_dequantize_into
    p = random_packed(512, 1024, 2, 64, torch.float16, seed=5)
    args = (p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], 2, 64, 1024)
    out = torch.empty(512, 1024, device="cuda", dtype=torch.float16)
    assert torch.equal(tdq.dequantize_into(out, *args), ref.dequantize(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_kernel_strided_x_and_every_warp_count(bits, dtype):
    """x rows that are not 16-byte aligned (a column slice of a wider tensor) take the checked loads; every
    warps-per-CTA count splits K correctly."""
    n, k = 256, 1024
    p = random_packed(n, k, bits, 64, dtype, seed=7)
    wide = torch.randn(5, k + 3, device="cuda").to(dtype)
    x = wide[:, 1:k + 1]
    args = (x, p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], bits, 64, k, None)
    expected = ref.packed_matmul(x.contiguous(), *args[1:])
    assert_close_rel(cpp.cuda_packed_matmul(*args), expected, TOL[dtype], "strided x")
    xc = x.contiguous()
    for warps in range(1, 17):
        poison()
        out = cpp.cuda_packed_matmul(xc, *args[1:], warps=warps)
        assert_close_rel(out, expected, TOL[dtype], f"warps={warps}")


@pytest.fixture
def decode_codes():
    """Sets how the decode kernel feeds codes at M = 1 (cuda_decode_mma_set_codes); restores it afterwards."""
    previous = cpp._C.cuda_decode_mma_set_codes(0)
    yield lambda codes: cpp._C.cuda_decode_mma_set_codes(codes)
    cpp._C.cuda_decode_mma_set_codes(previous)


@pytest.mark.parametrize("codes", [0, 1])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 1024), (64, 1024), (128, 1024), (-1, 1024), (64, 448), (32, 96)])
@pytest.mark.parametrize("n", [96, 37])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_code_forms_match_ref(decode_codes, codes, bits, group_size, k, n, dtype):
    """Both ways of feeding codes to the tensor cores (0: a packed fma per pair, 1: fp16 subnormals at M = 1,
    2 and 4 bits; the other cases keep the first) against ref, whole shapes and ragged ones (N = 37, K not a
    multiple of a step), with the launcher's warps and with 1, 3 and 16; deterministic. Codes 1 is exact only
    where the tensor cores take subnormal operands (benchmarks/probes/mma_subnormals.cu)."""
    decode_codes(codes)
    p = random_packed(n, k, bits, group_size, dtype, seed=bits * 7 + n + codes)
    for m in (1, 5):
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        args = (x, p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], bits, group_size, k, bias)
        expected = ref.packed_matmul(*args)
        for warps in (0, 1, 3, 16):
            poison()
            out = cpp.cuda_packed_matmul(*args, warps=warps)
            assert_close_rel(out, expected, TOL[dtype], f"M={m} warps={warps}")
            assert torch.equal(out, cpp.cuda_packed_matmul(*args, warps=warps)), "not deterministic"


@pytest.mark.parametrize("bits", [2, 4])
def test_subnormal_codes_exact_on_integer_inputs(decode_codes, bits):
    """Codes 1 with every product and sum exact in fp32 (small-integer x, power-of-two scales, M = 1): the same
    bits as the reference, so a code the tensor cores flushed or misplaced fails here."""
    decode_codes(1)
    args, expected = exact_integer_case(bits, m=1, seed=4)
    assert torch.equal(cpp.cuda_packed_matmul(*args).float(), expected)


def exact_integer_case(bits, m, seed, device="cuda"):
    """Arguments of a decode call whose products and sums are all exact in fp32 (small-integer x, power-of-two
    scales, zero points far outside [0, Q]), and the reference's fp16 result as fp32."""
    n, k, g = 64, 512, 64
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = 2.0 ** torch.randint(-6, -2, (n, k // g), generator=gen).float()
    zeros = torch.randint(-200, 200, (n, k // g), generator=gen).float()
    p = packing.pack_weight(q, scales, zeros, QuantSpec(bits=bits, group_size=g), dtype=torch.float16)
    t = {k_: v.to(device) for k_, v in p.tensors().items()}
    x = torch.randint(-4, 5, (m, k), generator=gen).to(torch.float16).to(device)
    args = (x, t["qweight"], t["qweight_hi"], t["scales"], t["zeros"], bits, g, k, None)
    expected = ref.packed_matmul(x.float(), *args[1:3], t["scales"].float(), *args[4:])
    return args, expected.half().float()


@pytest.mark.parametrize("bits", [2, 3])
def test_decode_kernel_exact_on_integer_inputs(bits):
    """Small-integer x and scales that are powers of two make every product and sum exact in fp32: the kernel
    must then equal the reference bit for bit (no lost term, no wrong code, zero points far outside [0, Q])."""
    args, expected = exact_integer_case(bits, m=2, seed=3)
    assert torch.equal(cpp.cuda_packed_matmul(*args).float(), expected)


def test_decode_call_is_one_kernel_and_graph_capturable():
    """A decode call launches exactly one kernel and replays correctly from a CUDA graph."""
    n, k = 512, 1024
    p = random_packed(n, k, 2, 64, torch.float16, seed=11)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    args = (p["qweight"], p["qweight_hi"], p["scales"], p["zeros"], 2, 64, k, None)
    cpp.cuda_packed_matmul(x, *args)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        cpp.cuda_packed_matmul(x, *args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 1, [e.name for e in kernels]
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cpp.cuda_packed_matmul(x, *args)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        y = cpp.cuda_packed_matmul(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(y, ref.packed_matmul(x, *args), TOL[torch.float16], "graph replay")


@pytest.mark.parametrize("bits,group_size,k", [(2, 32, 96), (3, 64, 192), (4, 128, 256), (2, -1, 100)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("saliency", ["none", "S", "S+delta"])
def test_fake_quant_matches_ref(bits, group_size, k, symmetric, dtype, saliency):
    n = 37
    W = torch.randn(n, k, device="cuda").to(dtype)
    groups = k // (k if group_size == -1 else group_size)
    hi, lo = (torch.randn(n, groups, device="cuda") * 2 + 2 for _ in range(2))
    S = torch.rand(n, k, device="cuda").add_(0.1).to(dtype) if saliency != "none" else None
    delta = (torch.randn(n, k, device="cuda") * 0.01).to(dtype) if saliency == "S+delta" else None
    poison()
    what, reg = cpp.cuda_fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    what_ref, reg_ref = ref.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)
    assert_close_rel(what, what_ref, TOL[dtype], "What")
    if S is not None:
        assert_close_rel(reg, reg_ref, 1e-5, "reg")
    grad_what = torch.randn(n, k, device="cuda").to(dtype)
    grad_reg = torch.tensor(0.7, device="cuda")
    for need_dW in (False, True):
        poison()
        got = cpp.cuda_fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric,
                                          need_dW)
        exp = ref.fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)
        for name, a, b in zip(("dW", "dhi", "dlo", "ddelta"), got, exp):
            if b is None:
                assert a is None, name
            else:
                assert_close_rel(a, b, max(TOL[dtype], 1e-5), name)


@pytest.mark.parametrize("with_s", [False, True])
@pytest.mark.parametrize("numel", [1, 1000, 3_000_001])
def test_sq_error_matches_ref_and_is_deterministic(with_s, numel):
    A, B = torch.randn(numel, device="cuda"), torch.randn(numel, device="cuda")
    S = torch.rand(numel, device="cuda") if with_s else None
    poison()
    loss, grad = cpp.cuda_saliency_sq_error(A, B, S, True)
    loss_ref, grad_ref = ref.saliency_sq_error(A, B, S, True)
    assert_close_rel(loss, loss_ref, 1e-5, "loss")
    assert_close_rel(grad, grad_ref, 1e-5, "grad")
    assert torch.equal(loss, cpp.cuda_saliency_sq_error(A, B, S, False)[0])
