"""sparse_addmm (out = y + x Sp^T, Sp in CSR by output row) in every backend against saliq.ref and a dense fp64
product: odd shapes, empty rows, a long row, nnz = 0, M in {1, 3, 16, 33}, three dtypes; the in-place variant,
gradients, determinism, torch.compile, and the argument checks."""
import pytest
import torch

from conftest import TOLERANCE, assert_close, rel_err
from saliq import backends, ops, ref, validate

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MS = (1, 3, 16, 33)
# (N, K, long_row): N a multiple of nothing useful, a row with many nonzeros
SHAPES = [(37, 129, 100), (203, 64, 64), (1, 7, 7)]


def triton_available() -> bool:
    try:
        import saliq.triton_backend  # noqa: F401
    except ImportError:
        return False
    return "triton" in backends.available("sparse_addmm", "cuda" if torch.cuda.is_available() else "cpu")


BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no Triton")),
            pytest.param("cuda", marks=pytest.mark.gpu)]


def random_csr(n, k, long_row=0, density=0.05, empty_every=4, device="cpu"):
    """CSR [n, k] with fresh random values: distinct sorted columns per row, every `empty_every`-th row empty,
    row n // 2 holding `long_row` nonzeros."""
    counts = torch.binomial(torch.full((n,), float(k)), torch.full((n,), density)).long().clamp(1, k)
    if empty_every:
        counts[::empty_every] = 0
    if long_row:
        counts[n // 2] = long_row
    cols = torch.cat([torch.randperm(k)[:c].sort().values for c in counts.tolist()] or [torch.zeros(0)]).int()
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    vals = torch.randn(cols.numel()) * 0.1
    return rowptr.to(device), cols.to(device), vals.to(device)


def dense(rowptr, cols, vals, k):
    n = rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), rowptr.long().diff().cpu())
    Sp = torch.zeros(n, k, dtype=torch.float64)
    Sp.index_put_((rows, cols.long().cpu()), vals.double().cpu(), accumulate=True)
    return Sp


def inputs(m, n, k, dtype, long_row=0, device="cpu", **kw):
    rowptr, cols, vals = random_csr(n, k, long_row, device=device, **kw)
    x = torch.randn(m, k, device=device).to(dtype)
    y = torch.randn(m, n, device=device).to(dtype)
    return y, x, rowptr, cols, vals


def device_of(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def impl_of(backend):
    backends.load_optional_backends()
    return backends._impls[backend]["sparse_addmm"]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setenv("SALIQ_POISON_OUTPUTS", "1")  # Triton outputs NaN-filled before the kernel runs
    monkeypatch.setenv("SALIQ_AUTOTUNE", "0")


def poison_heap():
    """Leave NaN-filled freed memory behind, so an element the cpp kernel never writes shows up as NaN."""
    for n in (1 << 10, 1 << 14, 1 << 18):
        torch.full((n,), float("nan"))


# ---------------------------------------------------------------- the specification
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_ref_matches_dense_fp64(m, dtype):
    y, x, rowptr, cols, vals = inputs(m, 37, 129, dtype, long_row=100)
    out = ref.sparse_addmm(y, x, rowptr, cols, vals)
    expected = (y.double() + x.double() @ dense(rowptr, cols, vals, 129).t()).to(dtype)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    if dtype == torch.float32:
        assert rel_err(out, expected) <= 1e-6


def test_ref_adds_repeated_entries():
    x = torch.randn(2, 5)
    y = torch.randn(2, 2)
    rowptr = torch.tensor([0, 3, 3], dtype=torch.int32)
    cols = torch.tensor([4, 1, 4], dtype=torch.int32)
    vals = torch.tensor([0.5, -2.0, 0.25])
    out = ref.sparse_addmm(y, x, rowptr, cols, vals)
    assert torch.allclose(out[:, 0], y[:, 0] + 0.75 * x[:, 4] - 2.0 * x[:, 1])
    assert torch.equal(out[:, 1], y[:, 1])


# ---------------------------------------------------------------- backends against ref
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,long_row", SHAPES)
def test_backend_matches_ref(backend, n, k, long_row, m, dtype):
    device = device_of(backend)
    y, x, rowptr, cols, vals = inputs(m, n, k, dtype, long_row, device=device)
    expected = ref.sparse_addmm(y, x, rowptr, cols, vals)
    poison_heap()
    out = impl_of(backend)(y, x, rowptr, cols, vals)
    assert out.dtype == dtype and out.device == y.device
    assert_close(out, expected, dtype, f"{backend} {dtype} M={m}")
    exact = (y.double() + x.double() @ dense(rowptr, cols, vals, k).t().to(device)).to(dtype)
    assert rel_err(out, exact) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_nnz_zero_and_empty(backend, dtype):
    device = device_of(backend)
    fn = impl_of(backend)
    y = torch.randn(5, 11, device=device).to(dtype)
    x = torch.randn(5, 9, device=device).to(dtype)
    rowptr = torch.zeros(12, dtype=torch.int32, device=device)
    cols = torch.zeros(0, dtype=torch.int32, device=device)
    vals = torch.zeros(0, device=device)
    assert torch.equal(fn(y, x, rowptr, cols, vals), y)  # y + 0, cast back: y exactly
    # no rows of x, no output rows
    assert fn(y[:0], x[:0], rowptr, cols, vals).shape == (0, 11)
    r0 = torch.zeros(1, dtype=torch.int32, device=device)
    assert fn(y[:, :0], x, r0, cols, vals).shape == (5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16])
def test_into_poisoned_buffer_and_in_place(backend, m, dtype):
    device = device_of(backend)
    y, x, rowptr, cols, vals = inputs(m, 53, 97, dtype, long_row=60, device=device)
    expected = ref.sparse_addmm(y, x, rowptr, cols, vals)
    fn = impl_of(backend)
    out = torch.full_like(y, float("nan"))
    assert fn.into(y, x, rowptr, cols, vals, out) is out
    assert_close(out, expected, dtype, "into")
    y2 = y.clone()
    with ops.use_backend(backend):
        assert ops.sparse_addmm_(y2, x, rowptr, cols, vals) is y2
    assert torch.equal(y2, out)  # in place over y: the same values as into a separate buffer


@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_cpp_parallel_large_deterministic(m):
    # a layer-sized product on the threaded path, with chunks balanced by nonzeros around one very long row
    n, k = 3001, 2048
    y, x, rowptr, cols, vals = inputs(m, n, k, torch.float32, long_row=2000, density=0.01, empty_every=7)
    poison_heap()
    out = cpp.sparse_addmm(y, x, rowptr, cols, vals)
    assert_close(out, ref.sparse_addmm(y, x, rowptr, cols, vals), torch.float32)
    for _ in range(3):
        assert torch.equal(cpp.sparse_addmm(y, x, rowptr, cols, vals), out)


def test_cpp_rejects_malformed_csr_without_reading_out_of_bounds():
    y, x, rowptr, cols, vals = inputs(2, 9, 13, torch.float32)
    bad_cols = cols.clone()
    bad_cols[-1] = 13
    with pytest.raises(ValueError, match="CSR is invalid"):
        cpp.sparse_addmm(y, x, rowptr, bad_cols, vals)
    bad_rowptr = rowptr.clone()
    bad_rowptr[3] = cols.numel() + 100
    with pytest.raises(ValueError, match="CSR is invalid"):
        cpp.sparse_addmm(y, x, bad_rowptr, cols, vals)
    with pytest.raises(ValueError, match="CSR is invalid"):  # the public op with the content check skipped
        with ops.use_backend("cpp"):
            ops.sparse_addmm(y, x, rowptr, bad_cols, vals, check_csr=False)


# ---------------------------------------------------------------- the custom op: dispatch, autograd, compile
def test_default_cpu_backend_is_cpp():
    y, x, rowptr, cols, vals = inputs(1, 8, 8, torch.float32)
    assert backends.resolve("sparse_addmm", "cpu", y, x, rowptr, cols, vals) is cpp.sparse_addmm


@pytest.mark.parametrize("backend", ["ref"] + BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_dense(backend, dtype):
    device = device_of(backend) if backend != "ref" else "cpu"
    m, n, k = 3, 41, 67
    y0, x0, rowptr, cols, vals = inputs(m, n, k, dtype, long_row=50, device=device)
    w = torch.randn(m, n, device=device)
    y, x = y0.clone().requires_grad_(), x0.clone().requires_grad_()
    with ops.use_backend(backend):
        out = ops.sparse_addmm(y, x, rowptr, cols, vals)
        (out.float() * w).sum().backward()
    Sp = dense(rowptr, cols, vals, k).to(device)
    assert y.grad.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(y.grad, w.to(dtype))  # dy passes through
    assert_close(x.grad, (w.to(dtype).double() @ Sp).to(dtype), dtype, "dx")


def test_csr_transpose():
    rowptr, cols, vals = random_csr(23, 31, long_row=20)
    rt, ct, vt = ops.csr_transpose(rowptr, cols, vals, 31)
    assert rt.dtype == torch.int32 and ct.dtype == torch.int32 and rt.numel() == 32
    assert torch.equal(dense(rt, ct, vt, 23), dense(rowptr, cols, vals, 31).t())
    validate.csr(rt, ct, 23)


def test_opcheck():
    y, x, rowptr, cols, vals = inputs(3, 17, 29, torch.float32, long_row=10)
    x.requires_grad_()
    y.requires_grad_()
    torch.library.opcheck(torch.ops.saliq.sparse_addmm, (y, x, rowptr, cols, vals))


def test_compile_fullgraph_matches_eager():
    y0, x0, rowptr, cols, vals = inputs(4, 19, 33, torch.float32, long_row=12)

    def step(y, x):
        return ops.sparse_addmm(y, x, rowptr, cols, vals, check_csr=False) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    y, x = y0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = compiled(y, x)
    assert_close(out, step(y0, x0).detach(), torch.float32)
    out.sum().backward()
    Sp = dense(rowptr, cols, vals, 33)
    assert_close(x.grad, (2.0 * torch.ones(4, 19, dtype=torch.float64) @ Sp).float(), torch.float32, "dx")


# ---------------------------------------------------------------- argument checks
def _args(**over):
    y, x, rowptr, cols, vals = inputs(2, 6, 10, torch.float32, empty_every=0, density=0.3)
    a = dict(y=y, x=x, rowptr=rowptr, cols=cols, vals=vals)
    a.update({k: (v(a) if callable(v) else v) for k, v in over.items()})
    return a


@pytest.mark.parametrize("over,match", [
    (dict(x=lambda a: a["x"].double()), r"x has dtype torch.float64"),
    (dict(y=lambda a: a["y"].half()), r"y has dtype torch.float16; allowed: \(torch.float32,\)"),
    (dict(rowptr=lambda a: a["rowptr"].long()), r"rowptr has dtype torch.int64"),
    (dict(cols=lambda a: a["cols"].long()), r"cols has dtype torch.int64"),
    (dict(vals=lambda a: a["vals"].half()), r"vals has dtype torch.float16"),
    (dict(rowptr=lambda a: a["rowptr"][:-1]), r"y has shape \(2, 6\); expected \(2, 5\)"),
    (dict(rowptr=torch.zeros(0, dtype=torch.int32)), r"rowptr is empty"),
    (dict(y=lambda a: a["y"][:1]), r"y has shape \(1, 6\); expected \(2, 6\)"),
    (dict(vals=lambda a: a["vals"][:-1]), r"vals has shape"),
    (dict(x=lambda a: a["x"][0]), r"x must be 2-D"),
    (dict(vals=lambda a: torch.empty(a["vals"].shape, device="meta")), r"one device"),
    (dict(rowptr=lambda a: a["rowptr"] + 1), r"rowptr must start at 0 and end at nnz=\d+"),
    (dict(rowptr=lambda a: torch.cat([a["rowptr"][:-1], a["rowptr"][-1:] + 1])), r"rowptr\[-1\]=\d+"),
    (dict(rowptr=lambda a: torch.tensor([0, 3, 1, 4, 4, 4, a["cols"].numel()], dtype=torch.int32)),
     r"must not decrease; rowptr\[1\]=3 > rowptr\[2\]=1"),
    (dict(cols=lambda a: torch.cat([a["cols"][:-1], torch.tensor([10], dtype=torch.int32)])),
     r"cols holds values in \[\d+, 10\]; allowed: \[0, 9\]"),
    (dict(cols=lambda a: torch.cat([torch.tensor([-1], dtype=torch.int32), a["cols"][1:]])),
     r"cols holds values in \[-1, \d+\]"),
])
@pytest.mark.parametrize("fn", [ops.sparse_addmm, ops.sparse_addmm_])
def test_validation_errors(fn, over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**_args(**over))


def test_validation_type_error():
    with pytest.raises(TypeError, match="cols must be a torch.Tensor, got list"):
        ops.sparse_addmm(**_args(cols=[0, 1]))
