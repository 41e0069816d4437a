"""The test environment has every piece the suite tests: a missing saliq._C or Triton fails here, by name,
instead of letting dispatch fall back to the reference and the backend tests skip."""
import os

import torch

from saliq import backends


def test_every_optional_backend_loads():
    assert backends.load_optional_backends() == {}, "install with `make install` (or pip install -e '.[dev]')"


def test_each_backend_serves_its_device():
    ops = ("fake_quant_lwc_fwd", "fake_quant_lwc_bwd", "saliency_sq_error", "packed_matmul", "dequantize")
    for op in ops:
        assert "cpp" in backends.available(op, "cpu"), op
        if torch.cuda.is_available():
            assert "triton" in backends.available(op, "cuda"), op
        else:  # conftest.py selects the interpreter, so the Triton kernels run on CPU tensors
            assert os.environ.get("TRITON_INTERPRET") == "1"
            assert "triton" in backends.available(op, "cpu"), op
