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


def test_a_backend_that_adds_lora_and_reserved_weights_in_its_launch_gets_them(monkeypatch):
    # the dispatch of ops.packed_linear_trusted to a backend's with_extras (the CUDA decode kernel's hook),
    # checked on the CPU with a stand-in backend: the terms reach it, and where it declines (None) they are
    # added after its plain product
    from saliq import ops
    from saliq.packing import pack_weight

    torch.manual_seed(0)
    spec = QuantSpec(2, 32)
    n, k = 12, 64
    packed = pack_weight(torch.randint(0, 4, (n, k)), torch.rand(n, 2) * 0.1 + 0.01,
                         torch.randint(0, 4, (n, 2)).float(), spec, dtype=torch.float32)
    A, B = torch.randn(4, k), torch.randn(n, 4)
    rowptr = torch.tensor([0, 1] + [1] * (n - 1), dtype=torch.int32)
    cols, vals = torch.tensor([5], dtype=torch.int32), torch.tensor([2.0])
    x = torch.randn(3, k)
    args = (packed.qweight, packed.qweight_hi, packed.scales, packed.zeros, 2, 32, k)
    dense = ref.packed_matmul(x, *args, None)
    want = dense + 0.5 * (x @ A.t()) @ B.t()
    want[:, 0] += 2.0 * x[:, 5]
    seen = []
    real_resolve = backends.resolve

    def plain(x_, *a):
        return ref.packed_matmul(x_, *a)

    for declines in (False, True):
        def with_extras(x_, *a):
            seen.append(a[8:])
            if declines:
                return None
            lora_A, lora_B, scale, rp, cl, vl = a[8:]
            y = ref.packed_matmul(x_, *a[:8]) + scale * (x_ @ lora_A.t()) @ lora_B.t()
            return ref.sparse_addmm(y, x_, rp, cl, vl)

        plain.with_extras = with_extras
        monkeypatch.setattr(backends, "resolve", lambda op, dev, *a, _real=real_resolve: (
            plain if op == "packed_matmul" else _real(op, dev, *a)))
        with torch.no_grad():
            y = ops.packed_linear_trusted(x, *args, None, A, B, 0.5, (rowptr, cols, vals, None))
        assert torch.allclose(y, want, atol=1e-5), declines
        assert seen[-1][0] is A and seen[-1][3] is rowptr
