"""QuantLinear under torch.inference_mode(), torch.no_grad() and with gradients, at decode and prefill sizes, on
every backend this machine runs (cpp, ref, and triton under the interpreter): the same result as the reference,
and gradients where asked for. Inference mode is thread-local, so a kernel that writes its output from worker
threads must carry it there."""
import pytest
import torch

from saliq import backends, ref
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec

BACKENDS = [("cpu", b) for b in backends.available("packed_matmul", "cpu")]
if torch.cuda.is_available():  # a GPU run covers the CUDA backends too
    BACKENDS += [pytest.param("cuda", b, marks=pytest.mark.gpu) for b in backends.available("packed_matmul", "cuda")]


def _layer(bits):
    torch.manual_seed(bits)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 96), QuantSpec(bits=bits, group_size=64))
    layer.lora_A = torch.randn(4, 256) * 0.1
    layer.lora_B = torch.randn(96, 4) * 0.1
    layer.lora_rank, layer.lora_scale = 4, 4.0
    return layer


def _expected(layer, x):
    p = layer.packed
    return ref.packed_linear(x, p, layer.bias, layer.lora_A, layer.lora_B, layer.lora_scale)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 16, 17, 33, 48])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_quant_linear_in_every_mode(device, backend, m, mode):
    if device == "cpu" and backend == "triton" and m > 17:
        pytest.skip("the interpreter is slow; M > 16 is covered by 17")
    layer = _layer(2 + m % 3).to(device)
    x = torch.randn(m, 256, device=device)
    with backends.use_backend(backend):
        if mode == "inference_mode":
            with torch.inference_mode():
                y = layer(x)
        elif mode == "no_grad":
            with torch.no_grad():
                y = layer(x)
        else:
            xg = x.clone().requires_grad_()
            y = layer(xg)
            y.square().sum().backward()
            W = layer.dequantized_weight().float()  # fp32 throughout: cuda serves fp32 x up to M = 8
            expected_grad = (2 * y.detach()) @ (W + layer.lora_scale * layer.lora_B @ layer.lora_A)
            assert torch.allclose(xg.grad, expected_grad, rtol=1e-4, atol=1e-4)
    expected = _expected(layer, x)
    assert torch.allclose(y.detach(), expected, rtol=1e-5, atol=1e-5), f"{device} {backend} M={m} {mode}"
