"""The fused CPU QuantLinear forward (saliq._C.quant_linear: packed GEMV + LoRA + bias in one call) against
saliq/ref.py packed_linear, on every SIMD path this CPU supports, and its use by QuantLinear in eager inference.

Tolerance ||out - ref|| / ||ref||: fp32 1e-5, fp16 2e-3, bf16 1e-2 (the output's dtype; sums are fp32 inside).
"""
import pytest
import torch

from saliq import cpp_backend as cpp
from saliq import ops, ref
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec
from test_cpp_backend import TOL, assert_close_rel, gen, isa, poison_heap, random_packed  # noqa: F401  (isa: fixture)

GEMV_MAX_M = cpp._C.packed_matmul_gemv_max_m()


def lora(n, k, r, dtype, seed=1):
    g = gen(seed)
    return (torch.randn(r, k, generator=g) * 0.05).to(dtype), (torch.randn(n, r, generator=g) * 0.05).to(dtype)


def fused(x, p, bias=None, A=None, B=None, scale=0.0):
    return cpp._C.quant_linear(x, p.qweight, p.qweight_hi, p.scales, p.zeros, p.bits, p.group_size, p.in_features,
                               bias, A, B, scale)


def expected(x, p, bias=None, A=None, B=None, scale=0.0):
    return ref.packed_linear(x, p, bias, A, B, scale)


# N = 200: whole kernel blocks plus a ragged tail of columns; K = 192: three groups of 64, six of 32
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("rank", [0, 64])
def test_fp32_matches_ref_on_every_path(isa, bits, group_size, m, rank):
    n, k = 200, 192
    p = random_packed(n, k, bits, group_size, torch.float32, seed=bits + m)
    x = torch.randn(m, k, generator=gen(m))
    bias = torch.randn(n, generator=gen(7))
    A, B = lora(n, k, rank, torch.float32) if rank else (None, None)
    poison_heap()
    out = fused(x, p, bias, A, B, 16.0 / max(rank, 1))
    assert_close_rel(out, expected(x, p, bias, A, B, 16.0 / max(rank, 1)), TOL[torch.float32],
                     f"{isa} W{bits} g{group_size} M={m} r={rank}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lora_dtype", ["same", torch.float32])
@pytest.mark.parametrize("m", [1, 6])
def test_half_activations_and_lora_dtypes(isa, dtype, lora_dtype, m):
    n, k = 130, 128
    lora_dtype = dtype if lora_dtype == "same" else lora_dtype
    p = random_packed(n, k, 3, 64, dtype, seed=m)
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    A, B = lora(n, k, 8, lora_dtype)
    bias = torch.randn(n, generator=gen(3)).to(dtype)
    out = fused(x, p, bias, A, B, 2.0)
    assert_close_rel(out, expected(x, p, bias, A, B, 2.0), TOL[dtype], f"{isa} x {dtype} LoRA {lora_dtype} M={m}")


# ranks under a vector (the demo keeps 1 and 2: plain loops), one vector, a vector and a tail
@pytest.mark.parametrize("rank", [1, 2, 7, 16, 17])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3])
def test_every_lora_rank_and_dtype_on_every_path(isa, rank, lora_dtype, m):
    n, k = 200, 128
    p = random_packed(n, k, 2, 64, torch.float32, seed=rank)
    x = torch.randn(m, k, generator=gen(m))
    A, B = lora(n, k, rank, lora_dtype, seed=rank)
    bias = torch.randn(n, generator=gen(4))
    out = fused(x, p, bias, A, B, 3.0)
    assert_close_rel(out, expected(x, p, bias, A.float(), B.float(), 3.0), TOL[torch.float32],
                     f"{isa} rank {rank} LoRA {lora_dtype} M={m}")


def test_bf16_lora_on_fp32_activations_is_close_to_the_fp32_lora():
    """LoRA stored in bf16 (half the bytes) under fp32 activations: products and sums stay fp32, so the result is
    the reference computed with the bf16-rounded factors."""
    n, k = 96, 128
    p = random_packed(n, k, 2, 64, torch.float32)
    x = torch.randn(2, k, generator=gen(2))
    A, B = lora(n, k, 16, torch.float32)
    A16, B16 = A.bfloat16(), B.bfloat16()
    out = fused(x, p, None, A16, B16, 1.0)
    assert out.dtype == torch.float32
    assert_close_rel(out, expected(x, p, None, A16.float(), B16.float(), 1.0), TOL[torch.float32], "bf16 LoRA")


@pytest.mark.parametrize("m", [GEMV_MAX_M + 1, 48])
def test_prefill_sizes_use_the_tiled_path_with_lora(m):
    n, k = 70, 128
    p = random_packed(n, k, 2, 32, torch.float32)
    x = torch.randn(m, k, generator=gen(m))
    A, B = lora(n, k, 8, torch.float32)
    bias = torch.randn(n, generator=gen(5))
    assert_close_rel(fused(x, p, bias, A, B, 0.5), expected(x, p, bias, A, B, 0.5), TOL[torch.float32], f"M={m}")


def test_without_lora_the_same_bits_as_packed_matmul():
    """Small M: packed_matmul runs the same GEMV path, so the fused call and the custom op (autograd,
    torch.compile) agree exactly."""
    p = random_packed(300, 256, 3, 64, torch.float32)
    x = torch.randn(3, 256, generator=gen(0))
    bias = torch.randn(300, generator=gen(1))
    a = fused(x, p, bias)
    b = cpp._C.packed_matmul(x, p.qweight, p.qweight_hi, p.scales, p.zeros, 3, 64, 256, bias)
    assert torch.equal(a, b)


def test_results_do_not_depend_on_the_thread_count():
    """A layer large enough to run in parallel (rows of x A^T and column blocks shared by the threads) gives the
    same bits on one thread."""
    n, k = 576, 576
    p = random_packed(n, k, 2, 64, torch.float32)
    x = torch.randn(1, k, generator=gen(0))
    A, B = lora(n, k, 64, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, p, None, A, B, 0.25)
        torch.set_num_threads(max(2, threads))
        many = fused(x, p, None, A, B, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert_close_rel(one, expected(x, p, None, A, B, 0.25), TOL[torch.float32], "576 x 576")


def test_a_large_lora_rank_shares_one_parallel_region_with_the_blocks():
    """The rows of x A^T (64 claimed pieces at rank 512) and the column blocks run in one parallel region, each block
    adding its LoRA columns once every row of x A^T is done. A new x on every call (the rows' buffer is reused from
    call to call, so a block that read it early would see the previous call's rows): the same bits as one thread."""
    n, k = 512, 2048
    p = random_packed(n, k, 2, 64, torch.float32)
    xs = [torch.randn(1, k, generator=gen(i)) for i in range(20)]
    A, B = lora(n, k, 512, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [fused(x, p, None, A, B, 0.25) for x in xs]
        torch.set_num_threads(max(2, threads))
        many = [fused(x, p, None, A, B, 0.25) for x in xs]
    finally:
        torch.set_num_threads(threads)
    for x, a, b in zip(xs, one, many):
        assert torch.equal(a, b)
    assert_close_rel(one[0], expected(xs[0], p, None, A, B, 0.25), TOL[torch.float32], "rank 512")


def test_non_contiguous_inputs_are_accepted():
    n, k = 64, 128
    p = random_packed(n, k, 2, 64, torch.float32)
    x = torch.randn(k, 3, generator=gen(0)).t()  # [3, k], not contiguous
    At, Bt = lora(k, n, 4, torch.float32)
    A, B = Bt.t(), At.t()  # [4, k] and [n, 4], transposed views
    out = fused(x, p, None, A, B, 1.0)
    assert_close_rel(out, expected(x.contiguous(), p, None, A.contiguous(), B.contiguous(), 1.0),
                     TOL[torch.float32], "non-contiguous")


@pytest.mark.parametrize("call,match", [
    (lambda p, x, A, B: fused(x, p, None, A, None, 1.0), "lora_A and lora_B must be given together"),
    (lambda p, x, A, B: fused(x, p, None, A[:, :5], B, 1.0), r"lora_A must be \[r, 64\]"),
    (lambda p, x, A, B: fused(x, p, None, A, B[:, :2], 1.0), r"lora_B \[32, r\]"),
    (lambda p, x, A, B: fused(x[:, :32], p, None, A, B, 1.0), r"x must be \[M, 64\]"),
    (lambda p, x, A, B: fused(x.double(), p, None, A, B, 1.0), "x must be float32, bfloat16 or float16"),
])
def test_bad_arguments_raise_value_errors(call, match):
    p = random_packed(32, 64, 2, 32, torch.float32)
    A, B = lora(32, 64, 4, torch.float32)
    with pytest.raises(ValueError, match=match):
        call(p, torch.randn(2, 64), A, B)


def _quant_layer(n=96, k=128, rank=8):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(k, n), QuantSpec(bits=2, group_size=64))
    layer.lora_A, layer.lora_B = lora(n, k, rank, torch.float32)
    layer.lora_rank, layer.lora_scale = rank, 2.0
    return layer


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_quant_linear_runs_the_fused_call_in_eager_inference(mode, monkeypatch):
    layer = _quant_layer()
    calls = []
    real = cpp.packed_matmul.with_lora
    monkeypatch.setattr(cpp.packed_matmul, "with_lora", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ops, "_packed_matmul", lambda *a: pytest.fail("the custom op ran in eager inference"))
    x = torch.randn(1, 1, 128)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = layer(x)
    assert calls == [1] and y.shape == (1, 1, 96)
    assert_close_rel(y, ref.packed_linear(x, layer.packed, layer.bias, layer.lora_A, layer.lora_B, 2.0),
                     TOL[torch.float32], mode)


def test_quant_linear_with_trainable_lora_keeps_autograd():
    """LoRA factors that require grad (further training) take the custom op + matmul path, with gradients."""
    layer = _quant_layer()
    A = layer.lora_A.clone().requires_grad_()
    B = layer.lora_B.clone().requires_grad_()
    layer.lora_A, layer.lora_B = A, B
    y = layer(torch.randn(2, 128))
    y.square().sum().backward()
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0


# ---------------------------------------------------------------- the float layers: dense_linear, DenseLinear
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 1, 96), (9, 96)])  # 9 rows: F.linear
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_matches_f_linear(dtype, shape, bias):
    g = gen(sum(shape))
    W = torch.randn(300, 96, generator=g).to(dtype)
    b = torch.randn(300, generator=g).to(dtype) if bias else None
    x = torch.randn(*shape, generator=g).to(dtype)
    with torch.no_grad():
        out = ops.dense_linear(x, W, b)
    expected = torch.nn.functional.linear(x.float(), W.float(), None if b is None else b.float()).to(dtype)
    assert_close_rel(out, expected, TOL[dtype], f"{dtype} {shape} bias={bias}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 15, 17, 40, 130])  # under a vector, a vector and a tail, whole vectors
def test_dense_rows_on_every_path_match_f_linear(isa, dtype, k):
    """The dense GEMV (dense_rows.h: four FMA chains over alternate blocks of a row, then the tail; AVX-512, AVX2 or
    portable) at odd lengths and row counts, against F.linear in float64."""
    g = gen(k)
    for n in (1, 3, 6, 9):
        W = torch.randn(n, k, generator=g).to(dtype)
        x = torch.randn(3, k, generator=g)
        out = cpp._C.dense_linear(x, W, None)
        expected = torch.nn.functional.linear(x.double(), W.double()).float()
        assert_close_rel(out, expected, TOL[torch.float32], f"{isa} {dtype} n={n} k={k}")


def test_a_dense_row_gives_the_same_bits_wherever_it_falls(isa):
    """A row's bits must not depend on where it falls among the rows a call is given (how callers split the rows,
    among threads say, must not change results): dropping the first row moves every later one."""
    W = torch.randn(11, 300, generator=gen(5)).bfloat16()
    x = torch.randn(2, 300, generator=gen(6))
    assert torch.equal(cpp._C.dense_linear(x, W, None)[:, 1:], cpp._C.dense_linear(x, W[1:], None)), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 100, 576, 1030])  # plain loops, then rows of x 4, 4 and 3 at a time (AVX2: 2)
def test_a_row_of_x_gets_the_same_bits_alone_or_in_a_batch(isa, dtype, k):
    """dense_rows takes several rows of x against each row of W where they fit in L1; each (row of W, row of x) must
    still sum in the same order, so batching decode requests changes no output."""
    W = torch.randn(37, k, generator=gen(8)).to(dtype)
    x = torch.randn(4, k, generator=gen(9)).to(dtype)
    if dtype == torch.bfloat16 and k > 1024:
        x = x.float()  # bf16 rows of this length go to oneDNN's GEMM (dense_linear_cpu); keep this kernel's path
        W = W.float()
    batch = cpp._C.dense_linear(x, W, None)
    for i in range(4):
        assert torch.equal(batch[i:i + 1], cpp._C.dense_linear(x[i:i + 1], W, None)), (isa, dtype, k, i)


def test_every_half_of_an_fp16_weight_is_read_exactly(isa):
    """fp16 rows are widened to fp32 for the dot products (F16C on the AVX2 and AVX-512 paths, bit arithmetic on the
    portable one): with one-hot rows of x the output is the weight itself, for every finite half (subnormals
    included) at every place of a row: in a vector of 16, of 8, the tail, or a row shorter than a vector. Infinities
    and NaN come through too."""
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = halves[torch.isfinite(halves)]
    for k in (40, 5):  # two vectors of 16 (or five of 8) and a tail of 8 (or none); a row under a vector
        W = finite[: finite.numel() // k * k].reshape(-1, k)
        out = cpp._C.dense_linear(torch.eye(k), W, None)
        assert torch.equal(out, W.float().t()), (isa, k)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float16)
    k = 40
    W = torch.ones(3, k, dtype=torch.float16)
    W[:, 17] = special
    out = cpp._C.dense_linear(torch.eye(k)[17:18], W, None)[0]
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan(), isa


def test_dense_linear_results_do_not_depend_on_the_thread_count():
    W = torch.randn(4096, 576, generator=gen(0))  # 9 MiB: shared by the threads
    x = torch.randn(1, 576, generator=gen(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp._C.dense_linear(x, W, None)
        torch.set_num_threads(max(2, threads))
        many = cpp._C.dense_linear(x, W, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_dense_linears_share_the_tied_weights_and_keep_outputs_and_gradients():
    from fixtures_llama import make_tiny_llama
    from saliq.nn import DenseLinear, use_dense_linears

    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 7), generator=gen(0))
    with torch.no_grad():
        before = model(ids).logits
    keys = list(model.state_dict())
    assert use_dense_linears(model) == 15  # 7 linears in each of 2 blocks, and the LM head
    assert type(model.lm_head) is DenseLinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(ids[:, :1]).logits
    assert_close_rel(after, before[:, :1], TOL[torch.float32], "logits")
    head = DenseLinear.sharing(torch.nn.Linear(8, 4))
    x = torch.randn(1, 8, requires_grad=True)
    head(x).sum().backward()  # autograd: F.linear
    assert x.grad is not None and torch.allclose(x.grad, head.weight.sum(0).expand_as(x))
