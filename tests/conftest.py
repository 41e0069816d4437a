"""Shared test set-up: Triton runs under its interpreter when there is no GPU, and a few helpers."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(out, ref, dtype=None, name="output"):
    tol = TOLERANCE[dtype or ref.dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different, reproducible seed per test: fresh random inputs, never shared across tests
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
