"""Triton saliency-weighted squared error and MSE against saliq.ref: values, fused gradients, determinism."""
import pytest
import torch
from triton_setup import DEVICE, DTYPES, hermetic_kernels  # noqa: F401  (skips without Triton)

from conftest import assert_close, rel_err
from saliq import ops, ref
from saliq.kernels import common, sq_error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_s", [False, True])
@pytest.mark.parametrize("shape", [(1,), (37, 133), (3, 41, 129), (20011,)])
def test_matches_ref(shape, with_s, dtype):
    A = torch.randn(shape, device=DEVICE).to(dtype)
    B = torch.randn(shape, device=DEVICE).to(dtype)
    S = torch.rand(shape, device=DEVICE).to(dtype) if with_s else None
    loss, grad = sq_error.saliency_sq_error(A, B, S, True)
    loss_r, grad_r = ref.saliency_sq_error(A, B, S, True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, loss_r) <= 1e-5  # fp32 sums of the same fp32 terms, in another order
    assert grad.dtype == A.dtype
    assert_close(grad, grad_r, dtype, "grad")
    loss2, none = sq_error.saliency_sq_error(A, B, S, False)
    assert none is None and torch.equal(loss, loss2)


def test_mse_and_determinism():
    A = torch.randn(4, 33, 129, device=DEVICE)
    B = torch.randn(4, 33, 129, device=DEVICE)
    loss, grad = sq_error.mse(A, B, True)
    assert rel_err(loss, ((A - B) ** 2).mean()) <= 1e-5
    assert_close(grad, 2 * (A - B) / A.numel(), torch.float32, "grad")
    again, grad2 = sq_error.mse(A, B, True)
    assert torch.equal(loss, again) and torch.equal(grad, grad2)


def test_sum_partials_many_chunks():
    p = torch.randn(5000, device=DEVICE)
    assert rel_err(common.sum_partials(p), p.double().sum()) <= 1e-5
    assert torch.equal(common.sum_partials(p), common.sum_partials(p))


def test_custom_op_gradients():
    A0 = torch.randn(37, 133, device=DEVICE)
    B0 = torch.randn(37, 133, device=DEVICE)
    S = torch.rand(37, 133, device=DEVICE)
    out = {}
    for backend in ("ref", "triton"):
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        with ops.use_backend(backend):
            loss = ops.saliency_sq_error(A, B, S) * 0.7 + ops.mse(A, B)
            loss.backward()
        out[backend] = (loss.detach(), A.grad, B.grad)
    for a, b in zip(out["triton"], out["ref"]):
        assert rel_err(a, b) <= 1e-5
