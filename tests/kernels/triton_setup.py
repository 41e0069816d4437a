"""Set-up shared by the Triton kernel tests: the device they run on, and hermetic kernel settings.

Importing this module skips the importing test module when Triton cannot run here (no triton, or no GPU
and no TRITON_INTERPRET=1).
"""
import os

import pytest
import torch

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def hermetic_kernels(monkeypatch):
    monkeypatch.setenv("SALIQ_POISON_OUTPUTS", "1")  # NaN-filled outputs: an unwritten element fails
    monkeypatch.setenv("SALIQ_AUTOTUNE", "0")  # default configurations; no timing, no cache writes
