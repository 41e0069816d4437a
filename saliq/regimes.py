"""Which backend serves `packed_matmul` on CUDA tensors: an explicit table by rows of x and dtype.

| rows of x (M) | x dtype     | kernel                                                                    |
|---------------|-------------|---------------------------------------------------------------------------|
| 1..16         | fp16, bf16  | `cuda`: tensor-core decode kernel (csrc/cuda/decode_mma.cuh), one launch  |
| 1..8          | fp32        | `cuda`: fp32 GEMV (csrc/cuda/packed_gemv.cu)                              |
| otherwise     | any         | `triton`: tl.dot GEMM or dequantize (Triton or CUDA) + cuBLAS, per the    |
|               |             | per-GPU config table                                                      |

A backend that is not available (saliq._C built without CUDA, Triton missing) drops out of the table; the
reference serves what nothing else does. The table is a pure function of the call's shapes: no timing, no
first-call stall, the same choice on every run.
"""
from __future__ import annotations

import torch

from . import backends


def packed_matmul_backend(x: torch.Tensor, names: list[str]) -> str:
    """The backend among `names` (those available on CUDA) that serves x [M, K] @ packed weight."""
    if "cuda" in names:
        from .cpp_backend import cuda_max_m

        if 1 <= x.shape[0] <= cuda_max_m(x.dtype):
            return "cuda"
    if "triton" in names:
        return "triton"
    return "cuda" if "cuda" in names else "ref"


def packed_matmul_chooser(x, *rest) -> str:
    """Chooser for backends.set_chooser("packed_matmul", "cuda", ...)."""
    return packed_matmul_backend(x, backends.available("packed_matmul", "cuda"))


def install() -> None:
    backends.set_chooser("packed_matmul", "cuda", packed_matmul_chooser)
