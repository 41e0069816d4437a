"""The packed_matmul regime table (saliq/regimes.py): which backend serves which call, and QuantLinear's lean
path to it (no custom-op round trip in eager inference, the custom op under autograd and torch.compile)."""
import pytest
import torch

from saliq import backends, ops, regimes
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)


@pytest.mark.parametrize("m,dtype,names,expected", [
    (1, torch.float16, ["ref", "triton", "cuda"], "cuda"),
    (16, torch.bfloat16, ["ref", "triton", "cuda"], "cuda"),
    (17, torch.float16, ["ref", "triton", "cuda"], "triton"),
    (8, torch.float32, ["ref", "triton", "cuda"], "cuda"),
    (9, torch.float32, ["ref", "triton", "cuda"], "triton"),
    (4096, torch.float16, ["ref", "triton", "cuda"], "triton"),
    (1, torch.float16, ["ref", "triton"], "triton"),
    (64, torch.float16, ["ref", "cuda"], "cuda"),
    (1, torch.float16, ["ref"], "ref"),
])
def test_table(m, dtype, names, expected):
    x = torch.empty(m, 64, dtype=dtype, device="meta")
    assert regimes.packed_matmul_backend(x, names) == expected


def _layer(dtype=torch.float32, lora=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48).to(dtype)
    layer = QuantLinear.from_linear(linear, QuantSpec(bits=2, group_size=64))
    if lora:
        layer.lora_A = torch.randn(8, 128, dtype=dtype) * 0.1
        layer.lora_B = torch.randn(48, 8, dtype=dtype) * 0.1
        layer.lora_rank, layer.lora_scale = 8, 2.0
    return layer


def test_eager_inference_skips_the_dispatcher(monkeypatch):
    """Under no_grad a QuantLinear call reaches the backend without the custom op, with the same result."""
    layer = _layer()
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        expected = ops.packed_linear(x, layer.packed, layer.bias, layer.lora_A, layer.lora_B, layer.lora_scale)
    calls = []
    monkeypatch.setattr(ops, "_packed_matmul", lambda *a: calls.append(a))
    with torch.no_grad():
        out = layer(x)
    assert not calls, "eager inference went through the custom op"
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_autograd_goes_through_the_custom_op():
    layer = _layer(lora=False)
    x = torch.randn(4, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    W = layer.dequantized_weight()
    assert torch.allclose(x.grad, torch.ones(4, 48) @ W, rtol=1e-5, atol=1e-5)


def test_bad_input_still_gets_a_clear_error():
    layer = _layer()
    with pytest.raises(ValueError, match="in_features=128"):
        layer(torch.randn(2, 127))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not cpp.WITH_CUDA, reason="saliq._C was built without CUDA")
def test_quant_linear_on_gpu_uses_the_table_and_captures():
    layer = _layer(torch.float16).cuda()
    x = torch.randn(1, 128, device="cuda", dtype=torch.float16)
    args = (x, layer.qweight, layer.qweight_hi, layer.scales, layer.zeros, 2, 64, 128, layer.bias)
    assert backends.resolve("packed_matmul", "cuda", *args) is backends._impls["cuda"]["packed_matmul"]
    big = torch.randn(17, 128, device="cuda", dtype=torch.float16)
    assert backends.resolve("packed_matmul", "cuda", big, *args[1:]) is not backends._impls["cuda"]["packed_matmul"]
    with torch.no_grad():
        expected = layer(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(y, expected)
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
    assert torch.allclose(out.float(), expected.float(), rtol=2e-3, atol=2e-3)
