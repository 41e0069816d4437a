"""Triton packed matmul / packed linear / dequantize against saliq.ref, for every regime of the kernel."""
import pytest
import torch
from triton_setup import DEVICE, DTYPES, hermetic_kernels  # noqa: F401  (skips without Triton)

from conftest import assert_close
from saliq import ops, packing, ref
from saliq.kernels import dequantize as dq
from saliq.kernels import packed_matmul as pm
from saliq.spec import QuantSpec


def _packed(n, k, bits, group_size, dtype):
    g = k if group_size == -1 else group_size
    q = torch.randint(0, 2**bits, (n, k), device=DEVICE)
    s = torch.rand(n, k // g, device=DEVICE) * 0.1 + 0.01
    # zero points partly outside [0, Q], as LWC produces them
    z = torch.randint(-3, 2**bits + 3, (n, k // g), device=DEVICE).float()
    return packing.pack_weight(q, s, z, QuantSpec(bits=bits, group_size=group_size), dtype=dtype)


def _args(p):
    return p.qweight, p.qweight_hi, p.scales, p.zeros, p.bits, p.group_size, p.in_features


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_matches_ref(bits, group_size, dtype):
    p = _packed(37, 3 * (group_size if group_size > 0 else 64), bits, group_size, dtype)
    W = dq.dequantize(*_args(p))
    W_r = ref.dequantize(*_args(p))
    assert W.dtype == dtype
    if dtype == torch.bfloat16:
        assert_close(W, W_r, dtype, "W")  # the interpreter's bf16 conversion may round differently
    else:
        assert torch.equal(W, W_r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_matmul_matches_ref(bits, group_size, M, dtype):
    # K = 3 groups: K is not a multiple of every BLOCK_K, so the K masks are exercised; N is odd
    n, k = 37 if M > 16 else 133, 3 * group_size
    p = _packed(n, k, bits, group_size, dtype)
    x = torch.randn(M, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if M % 2 else None
    y = pm.packed_matmul(x, *_args(p), bias)
    y_r = ref.packed_matmul(x, *_args(p), bias)
    assert y.dtype == dtype
    assert_close(y, y_r, dtype, "y")


CONFIGS = [
    pm._cfg("gemv", BM=4, BN=32, BK=32, SK=1),
    pm._cfg("gemv", BM=4, BN=64, BK=64, SK=3),
    pm._cfg("gemm", BM=16, BN=32, BK=32, SK=1),
    pm._cfg("gemm", BM=16, BN=64, BK=64, SK=2, GM=2),
    pm._cfg("gemm", BM=32, BN=16, BK=128, SK=1, GM=2),  # BLOCK_K > group: per-element scales
    pm._cfg("dequant"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['kind']}-m{c['BLOCK_M']}-k{c['BLOCK_K']}-s{c['SPLIT_K']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group_size", [(3, 64), (2, -1), (4, 32)])
def test_every_regime_with_bias_and_lora(bits, group_size, dtype, cfg):
    n, k, M, r = 37, 192, 3, 20
    p = _packed(n, k, bits, group_size, dtype)
    x = torch.randn(M, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    A = (torch.randn(r, k, device=DEVICE) * 0.1).to(dtype)
    B = (torch.randn(n, r, device=DEVICE) * 0.1).to(dtype)
    y = pm.packed_linear(x, *_args(p), bias, A, B, 0.25, config=cfg)
    y_r = ref.packed_linear(x, p, bias, A, B, 0.25)
    assert_close(y, y_r, dtype, "y")
    y = pm.packed_linear(x, *_args(p), None, config=cfg)
    assert_close(y, ref.packed_linear(x, p), dtype, "y without bias")


def test_deterministic_split_k():
    p = _packed(133, 384, 3, 128, torch.float32)
    x = torch.randn(2, 384, device=DEVICE)
    cfg = pm._cfg("gemv", BM=2, BN=64, BK=64, SK=4)
    a = pm.packed_linear(x, *_args(p), config=cfg)
    b = pm.packed_linear(x, *_args(p), config=cfg)
    assert torch.equal(a, b)


def test_custom_op_packed_linear():
    p = _packed(37, 128, 2, 64, torch.float16)
    x0 = torch.randn(2, 5, 128, device=DEVICE).to(torch.float16)
    bias = torch.randn(37, device=DEVICE).to(torch.float16)
    out = {}
    for backend in ("ref", "triton"):
        x = x0.clone().requires_grad_()
        with ops.use_backend(backend):
            y = ops.packed_linear(x, p, bias)
            y.float().square().sum().backward()
            W = ops.dequantize(p)
        out[backend] = (y.detach(), x.grad, W)
    for a, b in zip(out["triton"], out["ref"]):
        assert_close(a, b, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_llama_shapes_on_gpu(bits, M):
    p = _packed(11008, 4096, bits, 64, torch.float16)
    x = torch.randn(M, 4096, device=DEVICE).to(torch.float16)
    assert_close(pm.packed_matmul(x, *_args(p), None), ref.packed_matmul(x, *_args(p), None), torch.float16)
