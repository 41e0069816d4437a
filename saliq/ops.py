"""saliq ops: torch.library custom ops with fake (meta) implementations and registered autograd.

Public functions validate their inputs in one place (`validate.py`), then call the `saliq::*` custom ops,
whose implementations dispatch to a backend (`backends.py`). docs/OPS.md states each contract.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, validate, word_order
from .backends import use_backend  # noqa: F401  (public: saliq.ops.use_backend)
from .packing import PackedWeight, packed_rows, plane_widths
from .sparse_slices import Slices
from .spec import QuantSpec

_EMPTY = (0,)


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _empty_like_device(ref: Tensor) -> Tensor:
    return ref.new_empty(_EMPTY)


# ---------------------------------------------------------------- fake_quant_lwc
@torch.library.custom_op("saliq::fake_quant_lwc", mutates_args=())
def _fake_quant_lwc(W: Tensor, hi: Tensor, lo: Tensor, S: Optional[Tensor], delta: Optional[Tensor],
                    bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    impl = backends.resolve("fake_quant_lwc_fwd", W.device.type, W, hi, lo, S, delta, bits, group_size,
                            symmetric)
    return impl(W, hi, lo, S, delta, bits, group_size, symmetric)


@_fake_quant_lwc.register_fake
def _(W, hi, lo, S, delta, bits, group_size, symmetric):
    return torch.empty_like(W), W.new_empty((), dtype=torch.float32)


@torch.library.custom_op("saliq::fake_quant_lwc_bwd", mutates_args=())
def _fake_quant_lwc_bwd(grad_what: Tensor, grad_reg: Tensor, W: Tensor, hi: Tensor, lo: Tensor,
                        S: Optional[Tensor], delta: Optional[Tensor], bits: int, group_size: int,
                        symmetric: bool, need_dW: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.resolve("fake_quant_lwc_bwd", W.device.type, grad_what, grad_reg, W, hi, lo, S, delta,
                            bits, group_size, symmetric, need_dW)
    dW, dhi, dlo, ddelta = impl(grad_what.contiguous(), grad_reg, W, hi, lo, S, delta, bits, group_size,
                                symmetric, need_dW)
    return (_empty_like_device(W) if dW is None else dW, dhi, dlo,
            _empty_like_device(W) if ddelta is None else ddelta)


@_fake_quant_lwc_bwd.register_fake
def _(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW):
    dW = torch.empty_like(W) if need_dW else W.new_empty(_EMPTY)
    ddelta = torch.empty_like(delta) if (delta is not None) else W.new_empty(_EMPTY)
    return dW, torch.empty_like(hi), torch.empty_like(lo), ddelta


def _fq_setup(ctx, inputs, output):
    W, hi, lo, S, delta, bits, group_size, symmetric = inputs
    ctx.save_for_backward(W, hi, lo, S, delta)
    ctx.attrs = (bits, group_size, symmetric)
    ctx.need_dW = ctx.needs_input_grad[0]


def _fq_backward(ctx, grad_what, grad_reg):
    W, hi, lo, S, delta = ctx.saved_tensors
    dW, dhi, dlo, ddelta = _fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, *ctx.attrs,
                                               ctx.need_dW)
    return (dW if ctx.need_dW else None, dhi, dlo, None,
            ddelta if delta is not None else None, None, None, None)


_fake_quant_lwc.register_autograd(_fq_backward, setup_context=_fq_setup)


def fake_quant_lwc(W: Tensor, hi: Tensor, lo: Tensor, spec: QuantSpec, S: Optional[Tensor] = None,
                   delta: Optional[Tensor] = None):
    """LWC fake quantization (docs/ARCHITECTURE.md 1.1) with straight-through gradients.

    W [N, K] (fp32/fp16/bf16), hi, lo [N, G] fp32 clipping logits. Returns What [N, K] in W.dtype; when
    the saliency S [N, K] is given, returns (What, reg) with reg = sum S (What + delta - W)^2 (fp32 scalar,
    delta [N, K] optional: the LoRA update for the "after_lora" penalty) computed in the same pass.
    Gradients flow to hi, lo, delta, and to W when W requires grad.
    """
    validate.fake_quant_args(W, hi, lo, spec, S, delta)
    if delta is not None and S is None:
        raise ValueError("delta is only used by the saliency term: pass S as well, or drop delta")
    what, reg = _fake_quant_lwc(W, hi, lo, S, delta, spec.bits, spec.group_size, spec.symmetric)
    return what if S is None else (what, reg)


# ---------------------------------------------------------------- saliency_sq_error
@torch.library.custom_op("saliq::saliency_sq_error", mutates_args=())
def _saliency_sq_error(A: Tensor, B: Tensor, S: Optional[Tensor], need_grad: bool) -> tuple[Tensor, Tensor]:
    impl = backends.resolve("saliency_sq_error", A.device.type, A, B, S, need_grad)
    loss, grad = impl(A, B, S, need_grad)
    return loss, (A.new_empty(_EMPTY) if grad is None else grad)


@_saliency_sq_error.register_fake
def _(A, B, S, need_grad):
    return A.new_empty((), dtype=torch.float32), (torch.empty_like(A) if need_grad else A.new_empty(_EMPTY))


def _sse_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _sse_backward(ctx, grad_loss, _grad_of_grad):
    (grad_a,) = ctx.saved_tensors
    if grad_a.numel() == 0:
        raise RuntimeError("saliency_sq_error was called without need_grad; its backward is unavailable")
    dA = grad_a * grad_loss.to(grad_a.dtype)
    return dA.to(ctx.dtypes[0]), (-dA).to(ctx.dtypes[1]), None, None


_saliency_sq_error.register_autograd(_sse_backward, setup_context=_sse_setup)


def saliency_sq_error(A: Tensor, B: Tensor, S: Optional[Tensor] = None) -> Tensor:
    """sum S (A - B)^2 as an fp32 scalar (S None: plain sum of squares); deterministic.

    Differentiable in A and B; the gradient 2 S (A - B) is written in the forward pass when needed.
    """
    validate.sq_error_args(A, B, S)
    need_grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)
    loss, _ = _saliency_sq_error(A.contiguous(), B.contiguous(), None if S is None else S.contiguous(),
                                 need_grad)
    return loss


def mse(A: Tensor, B: Tensor) -> Tensor:
    """Mean squared error through the deterministic saliency_sq_error reduction."""
    return saliency_sq_error(A, B) / A.numel()


# ---------------------------------------------------------------- packed ops
# Every packed op takes the words in format v1 ([rows, N]) or, on the CPU, in the CPU word order (1-D: a
# QuantLinear on the CPU keeps that, saliq/word_order.py); N is then the scales' second dimension.
def _words_for(impl, qweight: Tensor, qweight_hi: Tensor, bits: int, in_features: int, n: int):
    """The words as `impl` reads them: the CPU word order only where the backend takes it (cpp), else format v1."""
    if qweight.dim() == 1 and not getattr(impl, "cpu_word_order", False):
        return word_order.to_v1(qweight, qweight_hi, bits, in_features, n)
    return qweight, qweight_hi


def _columns(qweight: Tensor, bits: int, in_features: int) -> int:
    """N of a packed weight from its low plane alone (unpack has no scales)."""
    if qweight.dim() == 2:
        return qweight.shape[1]
    return qweight.numel() // packed_rows(in_features, plane_widths(bits)[0])


@torch.library.custom_op("saliq::dequantize", mutates_args=())
def _dequantize(qweight: Tensor, qweight_hi: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                group_size: int, in_features: int) -> Tensor:
    impl = backends.resolve("dequantize", qweight.device.type, qweight, qweight_hi, scales, zeros, bits,
                            group_size, in_features)
    qweight, qweight_hi = _words_for(impl, qweight, qweight_hi, bits, in_features, scales.shape[1])
    return impl(qweight, qweight_hi, scales, zeros, bits, group_size, in_features)


@_dequantize.register_fake
def _(qweight, qweight_hi, scales, zeros, bits, group_size, in_features):
    return scales.new_empty((scales.shape[1], in_features))


@torch.library.custom_op("saliq::packed_matmul", mutates_args=())
def _packed_matmul(x: Tensor, qweight: Tensor, qweight_hi: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                   group_size: int, in_features: int, bias: Optional[Tensor]) -> Tensor:
    impl = backends.resolve("packed_matmul", x.device.type, x, qweight, qweight_hi, scales, zeros, bits,
                            group_size, in_features, bias)
    qweight, qweight_hi = _words_for(impl, qweight, qweight_hi, bits, in_features, scales.shape[1])
    return impl(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias)


@_packed_matmul.register_fake
def _(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias):
    return x.new_empty((x.shape[0], scales.shape[1]))


def _pm_setup(ctx, inputs, output):
    x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias = inputs
    ctx.save_for_backward(qweight, qweight_hi, scales, zeros)
    ctx.attrs = (bits, group_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _pm_backward(ctx, grad_y):
    qweight, qweight_hi, scales, zeros = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        W = _dequantize(qweight, qweight_hi, scales, zeros, *ctx.attrs)
        dx = (grad_y.float() @ W.float()).to(ctx.x_dtype)
    dbias = grad_y.sum(0) if (ctx.has_bias and ctx.needs_input_grad[8]) else None
    return dx, None, None, None, None, None, None, None, dbias


_packed_matmul.register_autograd(_pm_backward, setup_context=_pm_setup)


def dequantize(packed: PackedWeight) -> Tensor:
    """Packed weight -> W [N, K] in the scales' dtype."""
    validate.packed_args(packed)
    return _dequantize(packed.qweight, packed.qweight_hi, packed.scales, packed.zeros, packed.bits,
                       packed.group_size, packed.in_features)


def packed_linear(x: Tensor, packed: PackedWeight, bias: Optional[Tensor] = None,
                  lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
                  lora_scale: float = 0.0) -> Tensor:
    """y = x What^T + lora_scale (x A^T) B^T + bias for x [..., K]; What from the packed weight.

    x: fp32/fp16/bf16 on the packed weight's device; output in x.dtype. Differentiable in x, bias, lora_A,
    lora_B (the packed weight is frozen).
    """
    validate.packed_linear_args(x, packed, bias, lora_A, lora_B)
    return packed_linear_trusted(x, packed.qweight, packed.qweight_hi, packed.scales, packed.zeros, packed.bits,
                                 packed.group_size, packed.in_features, bias, lora_A, lora_B, lora_scale)


def packed_linear_trusted(x: Tensor, qweight: Tensor, qweight_hi: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                          group_size: int, in_features: int, bias: Optional[Tensor], lora_A: Optional[Tensor],
                          lora_B: Optional[Tensor], lora_scale: float, sparse: Optional[tuple] = None) -> Tensor:
    """packed_linear without the argument checks, for callers that checked them once (QuantLinear checks its
    buffers when it is built and x's shape and device per call). Decode calls last microseconds, so the
    Python between a layer and its kernel matters: in plain eager inference the backend runs directly,
    without the custom-op dispatcher; under autograd, torch.compile or tensor subclasses the custom op runs.
    sparse: the layer's reserved weights (rowptr, cols, vals, slices or None), added as sparse_addmm_trusted_
    does; where the backend takes the slices in the same call (cpp), they share its threads."""
    flat = x.dim() == 2  # a reshape costs ~0.5 us here and another on the way out: hundreds of calls per token
    x2 = x if flat else x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    args = (x2, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias)
    if type(x2) is Tensor and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad) or (
                lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad)))):
        impl = backends.resolve("packed_matmul", x2.device.type, *args)
        args = (x2, *_words_for(impl, qweight, qweight_hi, bits, in_features, scales.shape[1]), *args[3:])
        with_extras = getattr(impl, "with_extras", None)
        if with_extras is not None and (lora_A is not None or sparse is not None):
            # the LoRA term and the reserved weights inside the decode kernel's launch (cuda)
            sp = sparse[:3] if sparse is not None and sparse[0].device == x2.device else (None, None, None)
            y = with_extras(*args, lora_A, lora_B, lora_scale, *sp)
            if y is not None:
                if sparse is not None and sp[0] is None:
                    y = sparse_addmm_trusted_(y, x2, *sparse)
                return y if flat else y.reshape(*x.shape[:-1], scales.shape[1])
        with_lora = getattr(impl, "with_lora", None)
        if with_lora is not None:  # the backend applies bias and LoRA in the same call (cpp)
            with_slices = getattr(with_lora, "with_slices", None)
            if sparse is not None and sparse[3] is not None and with_slices is not None and \
                    sparse[3].cols.device == x2.device:
                y = with_slices(*args, lora_A, lora_B, lora_scale, sparse[3])
                return y if flat else y.reshape(*x.shape[:-1], scales.shape[1])
            y = with_lora(*args, lora_A, lora_B, lora_scale)
            if sparse is not None:
                y = sparse_addmm_trusted_(y, x2, *sparse)
            return y if flat else y.reshape(*x.shape[:-1], scales.shape[1])
        y = impl(*args)
    else:
        y = _packed_matmul(*args)
    if lora_A is not None:
        # two small GEMMs, the scale and the sum folded into the second (addmm): two launches, not four
        y = torch.addmm(y, x2 @ lora_A.t(), lora_B.t(), alpha=lora_scale)
    if sparse is not None:
        y = sparse_addmm_trusted_(y, x2, *sparse)
    return y if flat else y.reshape(*x.shape[:-1], scales.shape[1])


def dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear for the float layers of a quantized model (its LM head). In eager CPU inference the backend's
    dense_linear runs (cpp: for decode-sized x, an fp32 GEMV over rows of W shared by the threads; torch's fp32
    GEMV runs on one thread here, at a third of the speed); with autograd, under torch.compile or on other devices,
    F.linear."""
    if type(x) is Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return backends.resolve("dense_linear", "cpu", x, weight, bias)(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("saliq::pack", mutates_args=())
def _pack(q: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return backends.resolve("pack", q.device.type, q, bits)(q, bits)


@_pack.register_fake
def _(q, bits):
    rows = packed_rows(q.shape[1], plane_widths(bits)[0])
    hi_shape = (packed_rows(q.shape[1], 1), q.shape[0]) if bits == 3 else _EMPTY
    return q.new_empty((rows, q.shape[0]), dtype=torch.int32), q.new_empty(hi_shape, dtype=torch.int32)


@torch.library.custom_op("saliq::unpack", mutates_args=())
def _unpack(qweight: Tensor, qweight_hi: Tensor, bits: int, in_features: int) -> Tensor:
    impl = backends.resolve("unpack", qweight.device.type, qweight, qweight_hi, bits, in_features)
    qweight, qweight_hi = _words_for(impl, qweight, qweight_hi, bits, in_features,
                                     _columns(qweight, bits, in_features))
    return impl(qweight, qweight_hi, bits, in_features)


@_unpack.register_fake
def _(qweight, qweight_hi, bits, in_features):
    return qweight.new_empty((_columns(qweight, bits, in_features), in_features), dtype=torch.uint8)


def pack(q: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Integers q [N, K] in [0, 2**bits - 1] -> (qweight, qweight_hi) in format v1 (docs/FORMAT.md)."""
    validate.pack_args(q, bits)
    return _pack(q.contiguous(), bits)


def unpack(qweight: Tensor, qweight_hi: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of pack: -> uint8 [N, in_features]."""
    validate.unpack_args(qweight, qweight_hi, bits, in_features)
    return _unpack(qweight, qweight_hi, bits, in_features)


# ---------------------------------------------------------------- sparse_addmm
@torch.library.custom_op("saliq::sparse_addmm", mutates_args=())
def _sparse_addmm(y: Tensor, x: Tensor, rowptr: Tensor, cols: Tensor, vals: Tensor) -> Tensor:
    impl = backends.resolve("sparse_addmm", x.device.type, y, x, rowptr, cols, vals)
    return impl(y, x, rowptr, cols, vals)


@_sparse_addmm.register_fake
def _(y, x, rowptr, cols, vals):
    return y.new_empty(y.shape)


def csr_transpose(rowptr: Tensor, cols: Tensor, vals: Tensor, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR of Sp^T [K, N] from the CSR of Sp [N, K]: entries grouped by column, in row order within a column (a
    stable sort), so products with it sum in a fixed order."""
    n = rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, dtype=torch.int32, device=cols.device), rowptr.long().diff(),
                                   output_size=cols.numel())
    order = torch.argsort(cols, stable=True)
    counts = torch.zeros(in_features, dtype=torch.int64, device=cols.device).index_add_(
        0, cols.long(), torch.ones_like(cols, dtype=torch.int64))
    rowptr_t = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return rowptr_t, rows[order], vals[order]


def _sa_setup(ctx, inputs, output):
    y, x, rowptr, cols, vals = inputs
    ctx.save_for_backward(rowptr, cols, vals)
    ctx.x_shape = tuple(x.shape)


def _sa_backward(ctx, grad):
    rowptr, cols, vals = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[1]:
        # dx = grad Sp: the same product with the transposed CSR (a gather per row of Sp^T, no atomics)
        m, k = ctx.x_shape
        g = grad.contiguous()
        dx = _sparse_addmm(g.new_zeros((m, k)), g, *csr_transpose(rowptr, cols, vals, k))
    return (grad if ctx.needs_input_grad[0] else None), dx, None, None, None


_sparse_addmm.register_autograd(_sa_backward, setup_context=_sa_setup)


def sparse_addmm(y: Tensor, x: Tensor, rowptr: Tensor, cols: Tensor, vals: Tensor, check_csr: bool = True) -> Tensor:
    """y + x Sp^T (a new tensor) for x [M, K], y [M, N] of one float dtype and Sp [N, K] in CSR by output row:
    rowptr int32 [N + 1], cols int32 [nnz], vals fp32 [nnz]. fp32 sums in a fixed order, one cast at the end.

    Differentiable in y and x (vals get no gradient). check_csr=False skips reading the CSR's contents (a device
    sync on a GPU) for callers that validated it once (validate.csr)."""
    validate.sparse_addmm_args(y, x, rowptr, cols, vals, check_csr)
    return _sparse_addmm(y.contiguous(), x.contiguous(), rowptr.contiguous(), cols.contiguous(), vals.contiguous())


def sparse_addmm_(y: Tensor, x: Tensor, rowptr: Tensor, cols: Tensor, vals: Tensor, check_csr: bool = True,
                  slices: Optional[Slices] = None) -> Tensor:
    """In place: y += x Sp^T (the reserved weights added to a packed matmul's output, for inference); returns y.
    In plain eager inference the backend writes into y directly (from `slices`, the same Sp in slices of 16 rows
    made by saliq.sparse_slices.csr_slices, where the backend has a kernel for them: the CPU's); under autograd
    or torch.compile this is y.copy_(sparse_addmm(...))."""
    validate.sparse_addmm_args(y, x, rowptr, cols, vals, check_csr)
    return sparse_addmm_trusted_(y, x, rowptr, cols, vals, slices)


def sparse_addmm_trusted_(y: Tensor, x: Tensor, rowptr: Tensor, cols: Tensor, vals: Tensor,
                          slices: Optional[Slices] = None) -> Tensor:
    """sparse_addmm_ without the argument checks, for callers whose operands were checked when they were built
    (QuantLinear's reserved weights: a decode step calls it in every layer)."""
    x = x.contiguous()
    if type(y) is Tensor and y.is_contiguous() and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
        impl = backends.resolve("sparse_addmm", x.device.type, y, x, rowptr, cols, vals)
        sliced = getattr(impl, "sliced", None)
        if slices is not None and sliced is not None and slices.cols.device == x.device:
            sliced(y, x, slices)
            return y
        into = getattr(impl, "into", None)
        if into is not None:  # the backend writes y + x Sp^T over y, element by element
            into(y, x, rowptr.contiguous(), cols.contiguous(), vals.contiguous(), y)
            return y
    return y.copy_(_sparse_addmm(y.contiguous(), x, rowptr.contiguous(), cols.contiguous(), vals.contiguous()))
