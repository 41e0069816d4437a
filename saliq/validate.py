"""Input checks for the public ops: one place, errors that name the argument, its value and what is allowed."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ref
from .packing import PackedWeight, validate_packed
from .spec import ALLOWED_BITS, QuantSpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(name: str, t, dims: Optional[int] = None, dtypes=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {dtypes}")


def quantizable_weight(name: str, W: Tensor) -> None:
    """A weight to quantize must be finite and within +-ref.WEIGHT_BOUND: one inf, NaN or huge value would
    set its group's scale and zero the rest of the group (docs/FORMAT.md, degenerate groups)."""
    bad = ~torch.isfinite(W)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (first at index {where}: "
                         f"{W[where].item()}); quantization needs finite weights")
    huge = W.abs() > ref.WEIGHT_BOUND
    if bool(huge.any()):
        where = tuple(int(i) for i in huge.nonzero()[0])
        raise ValueError(f"{name} has {int(huge.sum())} values beyond +-{ref.WEIGHT_BOUND:g} (first at index "
                         f"{where}: {W[where].item():g}); the largest quantization scale is {ref.SCALE_MAX:g}, so "
                         f"quantizable weights lie within +-{ref.WEIGHT_BOUND:g}")


def saliency_values(name: str, S: Tensor) -> None:
    """A saliency is a mean of squared gradients: finite and >= 0."""
    bad = ~torch.isfinite(S) | (S < 0)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} negative or non-finite values (first at index {where}: "
                         f"{S[where].item()}); a saliency must be finite and >= 0")


def _same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def _shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def fake_quant_args(W, hi, lo, spec, S, delta) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a saliq.QuantSpec, got {type(spec).__name__}")
    _tensor("W", W, 2, FLOAT_DTYPES)
    n, k = W.shape
    groups = spec.num_groups(k)
    for name, t in (("hi", hi), ("lo", lo)):
        _tensor(name, t, 2, (torch.float32,))
        _shape(name, t, (n, groups))
    if S is not None:
        _tensor("S", S, 2, FLOAT_DTYPES)
        _shape("S", S, (n, k))
    if delta is not None:
        _tensor("delta", delta, 2, FLOAT_DTYPES)
        _shape("delta", delta, (n, k))
    _same_device(W=W, hi=hi, lo=lo, S=S, delta=delta)
    for name, t in (("W", W), ("hi", hi), ("lo", lo), ("S", S), ("delta", delta)):
        if t is not None:
            _contiguous(name, t)


def sq_error_args(A, B, S) -> None:
    _tensor("A", A, dtypes=FLOAT_DTYPES)
    _tensor("B", B, dtypes=FLOAT_DTYPES)
    _shape("B", B, A.shape)
    if S is not None:
        _tensor("S", S, dtypes=FLOAT_DTYPES)
        _shape("S", S, A.shape)
    _same_device(A=A, B=B, S=S)


def packed_args(packed) -> None:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a saliq.packing.PackedWeight, got {type(packed).__name__}")
    validate_packed(packed)
    for name, t in packed.tensors().items():
        _contiguous(f"packed.{name}", t)


def packed_linear_args(x, packed, bias, lora_A, lora_B) -> None:
    packed_args(packed)
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != packed.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={packed.in_features}")
    if bias is not None:
        _tensor("bias", bias, 1, FLOAT_DTYPES)
        _shape("bias", bias, (packed.out_features,))
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        _tensor("lora_A", lora_A, 2, FLOAT_DTYPES)
        _tensor("lora_B", lora_B, 2, FLOAT_DTYPES)
        if lora_A.shape[1] != packed.in_features or lora_B.shape != (packed.out_features, lora_A.shape[0]):
            raise ValueError(
                f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} must be [r, {packed.in_features}] "
                f"and [{packed.out_features}, r]")
    _same_device(x=x, qweight=packed.qweight, bias=bias, lora_A=lora_A, lora_B=lora_B)


def pack_args(q, bits) -> None:
    _tensor("q", q, 2)
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {ALLOWED_BITS}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise ValueError(f"q must hold integers, got dtype {q.dtype}")


def unpack_args(qweight, qweight_hi, bits, in_features) -> None:
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {ALLOWED_BITS}")
    _tensor("qweight", qweight, 2, (torch.int32,))
    _tensor("qweight_hi", qweight_hi, dtypes=(torch.int32,))
    if in_features <= 0:
        raise ValueError(f"in_features={in_features} must be positive")
