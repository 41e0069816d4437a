"""The `triton` backend: registers the Triton kernels of saliq.kernels for every op they implement, and
installs measured dispatch between the CUDA backends.

Importing this module raises ImportError when Triton is not installed (backends.py then treats the backend
as unavailable). The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).

Dispatch on CUDA tensors: `packed_matmul` follows the explicit table of saliq/regimes.py (rows of x and dtype
-> kernel). For every other op, a chooser picks among the backends that implement it (`triton`, `cuda`) by
measured time. A decision is keyed by device name, op and shape bucket and stored in the per-GPU
cache of saliq.kernels.autotune. `tune(op, *args)` measures one call's arguments explicitly (the GPU report
does this); when the registry hands the chooser a call's full arguments it measures on the first call of
each bucket by itself. Until a bucket is measured, `triton` is the default.
"""
from __future__ import annotations

import inspect

import triton  # noqa: F401  (ImportError here marks the backend unavailable)
import torch

from . import backends, ref, regimes
from .kernels import autotune
from .kernels.dequantize import dequantize
from .kernels.fake_quant import fake_quant_lwc_bwd, fake_quant_lwc_fwd
from .kernels.packed_matmul import packed_matmul
from .kernels.sq_error import saliency_sq_error
from .kernels.sparse import sparse_addmm

IMPLS = {
    "fake_quant_lwc_fwd": fake_quant_lwc_fwd,
    "fake_quant_lwc_bwd": fake_quant_lwc_bwd,
    "saliency_sq_error": saliency_sq_error,
    "packed_matmul": packed_matmul,
    "dequantize": dequantize,
    "sparse_addmm": sparse_addmm,
}
COMPETING = ("triton", "cuda")  # backends measured against each other on CUDA tensors
_ARITY = {op: len(inspect.signature(getattr(ref, op)).parameters) for op in IMPLS}


def _bucket_key(op: str, args) -> tuple:
    """Shape bucket of a call: tensor shapes and dtypes (the row count of packed_matmul's x bucketed), and
    the scalar arguments."""
    key = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            shape = list(a.shape)
            if op == "packed_matmul" and i == 0 and shape:
                shape[0] = autotune.m_bucket(shape[0])
            key.append("x".join(map(str, shape)) + ":" + str(a.dtype).replace("torch.", ""))
        elif a is None or isinstance(a, (bool, int, float)):
            key.append(str(a))
    return tuple(key)


def _competitors(op: str) -> list[str]:
    return [b for b in backends.available(op, "cuda") if b in COMPETING]


def tune(op: str, *args) -> str:
    """Time every CUDA backend of `op` on these (full) arguments, record the fastest for their shape bucket
    and return its name."""
    names = _competitors(op)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    best, best_ms = "triton", float("inf")
    for name in names:
        fn = backends._impls[name][op]
        try:
            ms = autotune.cuda_time_ms(lambda: fn(*args))
        except Exception:  # a backend that cannot take this shape loses
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    autotune.record("backend:" + op, _bucket_key(op, args), {"backend": best, "ms": best_ms}, device)
    return best


def _make_chooser(op: str):
    def choose(*args) -> str:
        names = _competitors(op)
        if len(names) <= 1:
            return names[0] if names else "ref"
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return "triton"
        hit = autotune.lookup("backend:" + op, _bucket_key(op, args), device)
        if hit is not None and hit.get("backend") in names:
            return hit["backend"]
        if len(args) == _ARITY[op] and autotune.autotune_enabled():
            return tune(op, *args)  # the full arguments: measure now, once per bucket
        return "triton"

    return choose


def register() -> None:
    for op, fn in IMPLS.items():
        backends.register("triton", op, fn)
        if op != "packed_matmul":
            backends.set_chooser(op, "cuda", _make_chooser(op))
    regimes.install()  # packed_matmul: the explicit table by rows of x (saliq/regimes.py)


register()
