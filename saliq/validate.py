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


def reserved_weights(rowptr: Tensor, cols: Tensor, values: Tensor, out_features: int, in_features: int) -> None:
    """The CSR form of a layer's reserved weights (docs/FORMAT.md, "Reserved weights")."""
    _tensor("sparse_rowptr", rowptr, 1, (torch.int32,))
    _tensor("sparse_cols", cols, 1, (torch.int16, torch.int32))
    _tensor("sparse_values", values, 1, (torch.float16, torch.bfloat16))
    _shape("sparse_rowptr", rowptr, (out_features + 1,))
    nnz = values.numel()
    _shape("sparse_cols", cols, (nnz,))
    r = rowptr.long()
    if int(r[0]) != 0 or int(r[-1]) != nnz or bool((r.diff() < 0).any()):
        raise ValueError(f"sparse_rowptr must rise from 0 to nnz={nnz} without decreasing; got first "
                         f"{int(r[0])}, last {int(r[-1])}")
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= in_features):
        raise ValueError(f"sparse_cols holds values in [{int(cols.min())}, {int(cols.max())}]; allowed: "
                         f"[0, {in_features - 1}] (in_features={in_features})")


def sparse_addmm_args(y, x, rowptr, cols, vals, check_csr: bool = True) -> None:
    """y [M, N] and x [M, K] (one float dtype), Sp [N, K] in CSR: rowptr int32 [N + 1], cols int32 [nnz], vals
    fp32 [nnz]. check_csr also reads the CSR's contents (a device sync on a GPU): rowptr rises from 0 to nnz
    without decreasing, every column lies in [0, K)."""
    _tensor("x", x, 2, FLOAT_DTYPES)
    _tensor("y", y, 2, (x.dtype,))
    _tensor("rowptr", rowptr, 1, (torch.int32,))
    _tensor("cols", cols, 1, (torch.int32,))
    _tensor("vals", vals, 1, (torch.float32,))
    if rowptr.numel() == 0:
        raise ValueError("rowptr is empty; it must hold N + 1 >= 1 entries (N = y.shape[1])")
    m, k = x.shape
    n = rowptr.numel() - 1
    if tuple(y.shape) != (m, n):
        raise ValueError(f"y has shape {tuple(y.shape)}; expected {(m, n)} (rows of x, len(rowptr) - 1)")
    _shape("vals", vals, tuple(cols.shape))
    _same_device(y=y, x=x, rowptr=rowptr, cols=cols, vals=vals)
    if check_csr:
        csr(rowptr, cols, k)


def csr(rowptr: Tensor, cols: Tensor, in_features: int) -> None:
    """The contents of a CSR matrix [N, in_features]: rowptr rises from 0 to nnz = len(cols), cols in range."""
    nnz = cols.numel()
    r = rowptr.long()
    steps = r.diff()
    first_drop = int(torch.argmax((steps < 0).int())) if steps.numel() else 0
    lo, hi = (int(v) for v in torch.stack([cols.min(), cols.max()]).tolist()) if nnz else (0, 0)
    first, last = int(r[0]), int(r[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"rowptr must start at 0 and end at nnz={nnz} (len(cols)); got rowptr[0]={first}, "
                         f"rowptr[-1]={last}")
    if steps.numel() and int(steps[first_drop]) < 0:
        raise ValueError(f"rowptr must not decrease; rowptr[{first_drop}]={int(r[first_drop])} > "
                         f"rowptr[{first_drop + 1}]={int(r[first_drop + 1])}")
    if nnz and (lo < 0 or hi >= in_features):
        raise ValueError(f"cols holds values in [{lo}, {hi}]; allowed: [0, {in_features - 1}] "
                         f"(K={in_features}, the columns of x)")
