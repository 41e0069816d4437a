"""The public ops: validation, backend dispatch, custom-op registration, autograd and torch.compile."""
import pytest
import torch

from composite import omniquant_fake_quant
from conftest import rel_err
from saliq import backends, ops, ref
from saliq.packing import pack_weight
from saliq.spec import QuantSpec

SPEC = QuantSpec(bits=2, group_size=32)


def _fq_inputs(n=13, k=64, spec=SPEC):
    W = torch.randn(n, k)
    G = spec.num_groups(k)
    return W, (torch.randn(n, G) + 2).requires_grad_(), (torch.randn(n, G) + 2).requires_grad_()


def _packed(n=13, k=64, bits=3, group_size=32, dtype=torch.float32):
    q, s, z = ref.rtn_quantize(torch.randn(n, k), bits, group_size, False)
    return pack_weight(q, s, z, QuantSpec(bits, group_size), dtype=dtype)


def test_fake_quant_autograd_matches_composite():
    W, hi, lo = _fq_inputs()
    S = torch.rand_like(W)
    what, reg = ops.fake_quant_lwc(W, hi, lo, SPEC, S=S)
    g = torch.randn_like(W)
    dhi, dlo = torch.autograd.grad((what * g).sum() + 0.5 * reg, (hi, lo))
    what_c = omniquant_fake_quant(W, hi, lo, 2, 32, False)
    dhi_c, dlo_c = torch.autograd.grad((what_c * g).sum() + 0.5 * (S * (what_c - W) ** 2).sum(), (hi, lo))
    assert torch.equal(what, what_c)
    assert rel_err(dhi, dhi_c) < 1e-5 and rel_err(dlo, dlo_c) < 1e-5


def test_fake_quant_trainable_weight_and_delta_get_gradients():
    W, hi, lo = _fq_inputs()
    W.requires_grad_()
    delta = (torch.randn_like(W) * 0.01).requires_grad_()
    what, reg = ops.fake_quant_lwc(W, hi, lo, SPEC, S=torch.rand_like(W), delta=delta)
    (what.sum() + reg).backward()
    assert W.grad is not None and delta.grad is not None and delta.grad.abs().sum() > 0


def test_opcheck_custom_ops():
    W, hi, lo = _fq_inputs()
    S = torch.rand_like(W)
    torch.library.opcheck(torch.ops.saliq.fake_quant_lwc, (W, hi, lo, S, None, 2, 32, False))
    A = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.saliq.saliency_sq_error, (A, torch.randn(4, 6), torch.rand(4, 6), True),
                          test_utils=("test_schema", "test_faketensor"))
    p = _packed()
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.saliq.packed_matmul,
                          (x, p.qweight, p.qweight_hi, p.scales, p.zeros, 3, 32, 64, torch.randn(13)))
    torch.library.opcheck(torch.ops.saliq.dequantize, (p.qweight, p.qweight_hi, p.scales, p.zeros, 3, 32, 64))


def test_saliency_sq_error_gradients():
    A = torch.randn(5, 7, requires_grad=True)
    B = torch.randn(5, 7, requires_grad=True)
    S = torch.rand(5, 7)
    loss = ops.saliency_sq_error(A, B, S)
    loss.backward()
    assert torch.allclose(loss, (S * (A - B) ** 2).sum())
    assert torch.allclose(A.grad, 2 * S * (A - B)) and torch.allclose(B.grad, -2 * S * (A - B))
    assert torch.allclose(ops.mse(A, B), torch.nn.functional.mse_loss(A, B))


def test_packed_linear_matches_dense_and_backprops():
    p = _packed()
    x = torch.randn(2, 5, 64, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(13, 4, requires_grad=True)
    y = ops.packed_linear(x, p, bias, A, B, 0.25)
    W = ops.dequantize(p)
    dense = x @ W.t() + bias + 0.25 * (x @ A.t()) @ B.t()
    assert y.shape == (2, 5, 13) and rel_err(y, dense) < 1e-6
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (x, bias, A, B))
    grads_d = torch.autograd.grad((dense * g).sum(), (x, bias, A, B))
    for got, want in zip(grads, grads_d):
        assert rel_err(got, want) < 1e-5


def test_compile_fullgraph_matches_eager():
    W, hi, lo = _fq_inputs()
    p = _packed()
    x = torch.randn(3, 64)

    def step(x, W, hi, lo):
        what = ops.fake_quant_lwc(W, hi, lo, SPEC)
        return ops.packed_linear(x, p) + x @ what.t()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, W, hi, lo)
    assert torch.allclose(out, step(x, W, hi, lo))
    out.sum().backward()
    assert hi.grad is not None


@pytest.mark.parametrize("call,match", [
    (lambda W, hi, lo: ops.fake_quant_lwc(W.double(), hi, lo, SPEC), r"W has dtype torch.float64"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W, hi[:, :1], lo, SPEC), r"hi has shape \(13, 1\); expected \(13, 2\)"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W, hi, lo, SPEC, S=torch.rand(2, 2)), r"S has shape \(2, 2\)"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W.t(), hi, lo, QuantSpec(2, -1)), r"hi has shape"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W, hi, lo, SPEC, delta=torch.zeros_like(W)), r"pass S as well"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W[:, :60], hi, lo, SPEC), r"group_size=32 does not divide in_features=60"),
    (lambda W, hi, lo: ops.fake_quant_lwc(W, hi, lo, "2bit"), r"spec must be a saliq.QuantSpec"),
])
def test_fake_quant_errors_name_the_argument(call, match):
    W, hi, lo = _fq_inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        call(W, hi.detach(), lo.detach())


def test_packed_linear_errors_name_the_argument():
    p = _packed()
    with pytest.raises(ValueError, match=r"last dimension must be in_features=64"):
        ops.packed_linear(torch.randn(2, 63), p)
    with pytest.raises(ValueError, match=r"bias has shape \(12,\); expected \(13,\)"):
        ops.packed_linear(torch.randn(2, 64), p, bias=torch.randn(12))
    with pytest.raises(ValueError, match="lora_A and lora_B must be given together"):
        ops.packed_linear(torch.randn(2, 64), p, lora_A=torch.randn(4, 64))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        ops.packed_linear(torch.ones(2, 64, dtype=torch.long), p)


def test_backend_registry_forcing_and_errors(monkeypatch):
    calls = []

    def spy(*args):
        calls.append("spy")
        return ref.dequantize(*args)

    monkeypatch.setitem(backends._impls["cuda"], "dequantize", spy)
    p = _packed()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        with ops.use_backend("cuda"):
            ops.dequantize(p)
    with pytest.raises(ValueError, match=r"backend='tpu' is unknown"):
        with ops.use_backend("tpu"):
            pass
    monkeypatch.setenv("SALIQ_BACKEND", "ref")
    assert backends.forced() == "ref"
    with ops.use_backend("ref"):
        assert torch.equal(ops.dequantize(p), ref.dequantize(p.qweight, p.qweight_hi, p.scales, p.zeros, 3, 32, 64))
    assert calls == []
    monkeypatch.setenv("SALIQ_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"backend='nope' is unknown"):
        ops.dequantize(p)


def test_a_kept_resolution_follows_the_registry_and_the_forcing(monkeypatch):
    """resolve() keeps the default's choice per (op, device) (a decode step resolves hundreds of calls), so it must
    still see a replaced implementation, an op gained by a backend earlier in the order, use_backend and
    SALIQ_BACKEND."""
    monkeypatch.delenv("SALIQ_BACKEND", raising=False)
    real = backends.resolve("dequantize", "cpu")
    assert backends.resolve("dequantize", "cpu") is real  # kept

    def spy(*args):
        return ref.dequantize(*args)

    monkeypatch.setitem(backends._impls["cpp"], "dequantize", spy)
    assert backends.resolve("dequantize", "cpu") is spy
    monkeypatch.undo()
    assert backends.resolve("dequantize", "cpu") is real
    monkeypatch.delitem(backends._impls["cpp"], "dequantize")
    assert backends.resolve("dequantize", "cpu") is backends._impls["ref"]["dequantize"]
    monkeypatch.undo()  # cpp, earlier in the order, has the op again
    assert backends.resolve("dequantize", "cpu") is real
    with ops.use_backend("ref"):
        assert backends.resolve("dequantize", "cpu") is backends._impls["ref"]["dequantize"]
        with ops.use_backend(None):
            assert backends.resolve("dequantize", "cpu") is real
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        with ops.use_backend("cuda"):
            backends.resolve("dequantize", "cpu")
    assert backends._forcing == 0 and backends.resolve("dequantize", "cpu") is real
    monkeypatch.setenv("SALIQ_BACKEND", "ref")
    assert backends.resolve("dequantize", "cpu") is backends._impls["ref"]["dequantize"]


def test_chooser_picks_backend_by_shape(monkeypatch):
    seen = []

    def fake_cpp(x, *rest):
        seen.append(x.shape[0])
        return ref.packed_matmul(x, *rest)

    monkeypatch.setitem(backends._impls["cpp"], "packed_matmul", fake_cpp)
    monkeypatch.setitem(backends._choosers, ("packed_matmul", "cpu"),
                        lambda x, *rest: "cpp" if x.shape[0] == 1 else "ref")
    p = _packed()
    ops.packed_linear(torch.randn(1, 64), p)
    ops.packed_linear(torch.randn(4, 64), p)
    assert seen == [1]
