"""The reserved weights in slices of 16 rows (saliq/sparse_slices.py) and the CPU kernels that read them
(csrc/cpu/sliced_sparse*.cpp, and inside the packed GEMV's work in quant_linear_ops.cpp) against saliq.ref: the
slices hold every nonzero once in CSR order, the kernels match ref on odd shapes, skewed and empty rows, int16 and
int32 columns, M from 1 to 40 (the prefill path past 32) and three dtypes, an inf in x reaches only the rows that
use it, one thread gives the bits of two, and QuantLinear uses them."""
import pytest
import torch

from conftest import assert_close
from saliq import ops, ref
from saliq.sparse_slices import LANES, csr_slices
from test_cpp_backend import random_packed
from test_sparse_addmm import random_csr

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, K, long_row): N below, at and past a multiple of 16; K past int16 for int32 columns
SHAPES = [(7, 30, 0), (16, 64, 40), (203, 129, 100), (50, 40000, 300)]


def from_slices(s, n):
    """(row, col, val) triples of the slices, each row's in slot order."""
    triples = []
    for sl in range(s.slot_ptr.numel() - 1):
        for j in range(int(s.slot_ptr[sl]), int(s.slot_ptr[sl + 1])):
            for lane in range(int(s.slot_lanes[j])):
                row = int(s.lane_rows[sl * LANES + lane])
                assert 0 <= row < n
                triples.append((row, j, int(s.cols[j * LANES + lane]), float(s.vals[j * LANES + lane])))
    triples.sort(key=lambda t: (t[0], t[1]))
    return [(r, c, v) for r, _, c, v in triples]


@pytest.mark.parametrize("n,k,long_row", SHAPES)
def test_slices_hold_every_nonzero_once_in_csr_order(n, k, long_row):
    torch.manual_seed(n + k)
    rowptr, cols, vals = random_csr(n, k, long_row)
    s = csr_slices(rowptr, cols, vals, k)
    rows = torch.repeat_interleave(torch.arange(n), rowptr.long().diff())
    assert from_slices(s, n) == list(zip(rows.tolist(), cols.tolist(), vals.tolist()))
    assert s.cols.dtype == (torch.int16 if k <= 32767 else torch.int32)
    assert sorted(r for r in s.lane_rows.tolist() if r >= 0) == list(range(n))
    for sl in range(s.slot_ptr.numel() - 1):  # lanes in use shrink slot by slot, so they are a prefix
        lanes = s.slot_lanes[int(s.slot_ptr[sl]):int(s.slot_ptr[sl + 1])].tolist()
        assert lanes == sorted(lanes, reverse=True) and all(1 <= v <= LANES for v in lanes)
    unused = torch.ones(s.vals.numel(), dtype=torch.bool)
    for sl in range(s.slot_ptr.numel() - 1):
        for j in range(int(s.slot_ptr[sl]), int(s.slot_ptr[sl + 1])):
            unused[j * LANES:j * LANES + int(s.slot_lanes[j])] = False
    assert (s.vals[unused] == 0).all() and (s.cols[unused] == 0).all()


@pytest.mark.parametrize("n,k,long_row", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 9, 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_ref(n, k, long_row, m, dtype):
    torch.manual_seed(7 * n + m)
    rowptr, cols, vals = random_csr(n, k, long_row)
    x = torch.randn(m, k).to(dtype)
    y = torch.randn(m, n).to(dtype)
    want = ref.sparse_addmm(y, x, rowptr, cols, vals)
    got = y.clone()
    assert cpp.sliced_sparse_addmm_(got, x, csr_slices(rowptr, cols, vals, k)) is got
    assert_close(got, want, dtype, f"n={n} k={k} m={m} {dtype}")


def test_no_nonzeros_and_one_thread_against_two():
    rowptr = torch.zeros(21, dtype=torch.int32)
    y = torch.randn(2, 20)
    got = y.clone()
    cpp.sliced_sparse_addmm_(got, torch.randn(2, 8), csr_slices(rowptr, torch.zeros(0, dtype=torch.int32),
                                                                torch.zeros(0), 8))
    assert torch.equal(got, y)
    torch.manual_seed(3)
    rowptr, cols, vals = random_csr(3000, 2000, 500, density=0.02)  # large enough for both threads
    s = csr_slices(rowptr, cols, vals, 2000)
    x, y = torch.randn(2, 2000), torch.randn(2, 3000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.sliced_sparse_addmm_(y.clone(), x, s)
        torch.set_num_threads(2)
        two = cpp.sliced_sparse_addmm_(y.clone(), x, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert_close(two, ref.sparse_addmm(y, x, rowptr, cols, vals), torch.float32, "threads")


def test_an_inf_in_x_reaches_only_the_rows_that_use_it():
    """Unused lanes hold column 0: x[0] = inf must not turn their rows into NaN."""
    rowptr, cols, vals = random_csr(40, 50, 45)
    x = torch.randn(1, 50)
    x[0, 0] = float("inf")
    y = torch.randn(1, 40)
    want = ref.sparse_addmm(y, x, rowptr, cols, vals)
    got = cpp.sliced_sparse_addmm_(y.clone(), x, csr_slices(rowptr, cols, vals, 50))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert finite.sum() > 0 and torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_bad_slices_are_refused_with_a_clear_error():
    rowptr, cols, vals = random_csr(20, 30)
    s = csr_slices(rowptr, cols, vals, 30)
    with pytest.raises(ValueError, match="slot_ptr must be a CPU int32"):
        cpp.sliced_sparse_addmm_(torch.randn(1, 40), torch.randn(1, 30), s)
    with pytest.raises(ValueError, match="vals must be float32"):
        cpp.sliced_sparse_addmm_(torch.randn(1, 20), torch.randn(1, 30), s._replace(vals=s.vals.double()))
    with pytest.raises(ValueError, match="one dtype"):
        cpp.sliced_sparse_addmm_(torch.randn(1, 20).bfloat16(), torch.randn(1, 30), s)


def test_ops_use_the_slices_unless_another_backend_is_forced():
    torch.manual_seed(5)
    rowptr, cols, vals = random_csr(37, 129, 100)
    x, y = torch.randn(3, 129), torch.randn(3, 37)
    s = csr_slices(rowptr, cols, vals, 129)
    want = ref.sparse_addmm(y, x, rowptr, cols, vals)
    with torch.no_grad():
        assert_close(ops.sparse_addmm_(y.clone(), x, rowptr, cols, vals, slices=s), want,
                     torch.float32, "sliced")
        with ops.use_backend("ref"):
            assert torch.equal(ops.sparse_addmm_(y.clone(), x, rowptr, cols, vals, slices=s), want)
    # under autograd the op (and its backward) runs, not the in-place kernel
    xg = x.clone().requires_grad_()
    out = ops.sparse_addmm_(y.clone(), xg, rowptr, cols, vals, slices=s)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_quant_linear_adds_its_reserved_weights_from_slices_made_on_first_use():
    from saliq import outliers
    from saliq.nn import FakeQuantLinear
    from saliq.spec import QuantSpec

    torch.manual_seed(11)
    spec = QuantSpec(2, 32)
    fq = FakeQuantLinear(torch.randn(45, 96) * 0.1, torch.randn(45), spec)
    fq.reserve(outliers.select(fq.weight, None, spec, 0.03, "magnitude"))
    ql = fq.to_quant_linear()
    # the corrections, read at the reserved positions only, equal value - What of the whole dequantized weight
    rows = torch.repeat_interleave(torch.arange(45), ql.sparse_rowptr.long().diff())
    what = ref.dequantize(ql.packed.qweight, ql.packed.qweight_hi, ql.scales.float(), ql.zeros, 2, 32, 96)
    assert torch.equal(ql.sparse_correction, ql.sparse_values.float() - what[rows, ql.sparse_cols.long()])
    x = torch.randn(5, 96)
    with torch.no_grad():
        assert ql._sparse_slices is None
        got = ql(x)
        assert ql._sparse_slices is not None
        with ops.use_backend("ref"):
            want = ql(x)
        assert_close(got, want, torch.float32, "layer")
        assert_close(got, x @ ql.dequantized_weight().t() + ql.bias, torch.float32, "dense")
        ql.load_state_dict(ql.state_dict())  # the corrections are derived again, and the slices with them
        assert ql._sparse_slices is None
        assert torch.equal(ql(x), got)


@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [False, True])
def test_packed_matmul_and_reserved_weights_in_one_call_match_ref(m, dtype, lora):
    torch.manual_seed(m + 3 * int(lora))
    n, k = 203, 256
    p = random_packed(n, k, 2, 64, dtype, seed=m)
    rowptr, cols, vals = random_csr(n, k, 90)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    A, B = (torch.randn(8, k).to(dtype) * 0.1, torch.randn(n, 8).to(dtype) * 0.1) if lora else (None, None)
    args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, 2, 64, k, bias, A, B, 0.5)
    want = ref.sparse_addmm(ref.packed_linear(x, p, bias, A, B, 0.5), x, rowptr, cols, vals)
    s = csr_slices(rowptr, cols, vals, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.packed_linear_sliced(*args, s)
        torch.set_num_threads(2)
        two = cpp.packed_linear_sliced(*args, s)
    finally:
        torch.set_num_threads(threads)
    assert_close(two, want, dtype, f"m={m} {dtype} lora={lora}")
    assert torch.equal(one, two)
