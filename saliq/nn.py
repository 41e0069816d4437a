"""Drop-in linear layers: FakeQuantLinear for calibration, QuantLinear for inference on packed weights."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, outliers, ref, storage, validate, word_order
from .packing import PackedWeight, codes_at, expected_shapes, pack_weight
from .sparse_slices import csr_slices
from .spec import QuantSpec


class FakeQuantLinear(nn.Module):
    """A linear layer under calibration: frozen W, learnable clipping logits hi/lo, LoRA A/B.

    y = x What^T + (alpha / r) (x A^T) B^T + bias, What = fake_quant_lwc(W, hi, lo). When a saliency S is
    set, the same fused pass also yields the penalty sum S (Weff - W)^2, stored in `self.penalty`.

    lora_in_grid (quantization-grid-aware low rank, LR-QAT): the low-rank update moves the weight inside the
    quantizer, What = fake_quant_lwc(W + s (alpha / r) B A) with s each group's scale (no gradient), so it is
    measured in quantization steps and ends up in the integer codes: the packed layer needs no LoRA term.
    `reserve(mask)` keeps the masked weights exactly (16-bit) outside the quantization (saliq/outliers.py).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], spec: QuantSpec, lora_rank: int = 64,
                 lora_alpha: float = 16.0, init_logit: float = 4.0, lora_in_grid: bool = False):
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank} must be >= 0 (0 disables LoRA)")
        validate.quantizable_weight("weight", weight)
        self.spec = spec
        self.out_features, self.in_features = weight.shape
        groups = spec.num_groups(self.in_features)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.hi = nn.Parameter(torch.full((self.out_features, groups), float(init_logit), device=weight.device))
        self.lo = nn.Parameter(torch.full((self.out_features, groups), float(init_logit), device=weight.device))
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            a = torch.empty(lora_rank, self.in_features, device=weight.device, dtype=weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft initialises LoRA A
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_rank, device=weight.device,
                                                   dtype=weight.dtype))
        else:
            self.lora_A = self.lora_B = None
        self.register_buffer("saliency", None)
        self.after_lora = False
        self.penalty: Optional[Tensor] = None
        self.lora_in_grid = bool(lora_in_grid) and lora_rank > 0
        self.register_buffer("reserved", None)      # bool [N, K]: weights kept exactly, outside the groups
        self.register_buffer("weight_fill", None)   # W with the reserved weights replaced: what the codes quantize
        self.register_buffer("weight_kept", None)   # W with the reserved weights as stored (16-bit)
        self._base_stats = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, lora_rank: int = 64, lora_alpha: float = 16.0,
                    init_logit: float = 4.0, lora_in_grid: bool = False) -> "FakeQuantLinear":
        return cls(linear.weight, linear.bias, spec, lora_rank, lora_alpha, init_logit, lora_in_grid)

    def reserve(self, mask: Optional[Tensor]) -> None:
        """Keep the weights where `mask` [N, K] is True exactly (their 16-bit value) instead of quantizing them;
        their groups are quantized without them. Call before set_saliency; None or an empty mask clears it."""
        if mask is not None and tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {(self.out_features, self.in_features)}")
        if mask is None or not bool(mask.any()):
            self.reserved = self.weight_fill = self.weight_kept = None
        else:
            mask = mask.to(device=self.weight.device, dtype=torch.bool)
            self.reserved = mask
            self.weight_fill = outliers.fill_reserved(self.weight, mask, self.spec)
            self.weight_kept = outliers.reserved_values(self.weight, mask)
        self._base_stats = None

    def base_weight(self) -> Tensor:
        """The weight the packed codes quantize (W, or W with its reserved weights filled in)."""
        return self.weight if self.weight_fill is None else self.weight_fill

    def set_saliency(self, S: Optional[Tensor], after_lora: bool = False) -> None:
        """Attach the saliency S [N, K] (None detaches it); after_lora puts the LoRA update in Weff."""
        if S is not None and tuple(S.shape) != (self.out_features, self.in_features):
            raise ValueError(f"S has shape {tuple(S.shape)}; expected {(self.out_features, self.in_features)}")
        if S is not None:
            validate.saliency_values("S", S)
            S = S.to(device=self.weight.device, dtype=torch.float32)
            if self.reserved is not None:  # reserved weights are exact: no penalty there
                S = S.masked_fill(self.reserved, 0.0)
        self.saliency = None if S is None else S.contiguous()
        self.after_lora = after_lora
        self.penalty = None

    def lora_delta(self) -> Optional[Tensor]:
        return None if self.lora_A is None else self.lora_scale * (self.lora_B @ self.lora_A)

    def grid_delta(self) -> Tensor:
        """s (alpha / r) B A [N, K]: the in-quantizer low-rank update in units of each group's current step."""
        base = self.base_weight()
        if self._base_stats is None:  # the base weight is frozen: its group extremes once
            Wg = ref._grouped(base, self.spec.group_len(self.in_features))
            self._base_stats = (Wg.amax(-1), Wg.amin(-1))
        with torch.no_grad():
            s = ref.scale_zero(*self._base_stats, torch.sigmoid(self.hi.float()), torch.sigmoid(self.lo.float()),
                               self.spec.bits, self.spec.symmetric)[0]
        g = self.spec.group_len(self.in_features)
        d = (self.lora_scale * (self.lora_B @ self.lora_A)).reshape(self.out_features, -1, g) * s[..., None]
        return d.reshape(self.out_features, self.in_features).to(base.dtype)

    def _quantize(self, with_penalty: bool):
        if with_penalty and self.saliency is None:
            raise RuntimeError("no saliency set: call set_saliency(S) first")
        W = self.base_weight()
        if self.lora_in_grid:
            # penalty sum S (What(W + d) + d - (W + d))^2 = sum S (What - W)^2, and d trains through both paths
            d = self.grid_delta()
            W, delta = W + d, d
        else:
            delta = self.lora_delta() if self.after_lora else None
        if with_penalty:
            what, reg = ops.fake_quant_lwc(W, self.hi, self.lo, self.spec, S=self.saliency, delta=delta)
        else:
            what, reg = ops.fake_quant_lwc(W, self.hi, self.lo, self.spec), None
        if self.reserved is not None:
            what = torch.where(self.reserved, self.weight_kept, what)
        return what, reg

    def quantized_weight(self) -> Tensor:
        """What, differentiable in hi and lo."""
        return self._quantize(False)[0]

    def compute_penalty(self) -> Tensor:
        """sum S (Weff - W)^2 without a forward pass (the weight-only stage)."""
        return self._quantize(True)[1]

    def forward(self, x: Tensor) -> Tensor:
        what, self.penalty = self._quantize(self.saliency is not None)
        y = F.linear(x, what, self.bias)
        if self.lora_A is not None and not self.lora_in_grid:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    @torch.no_grad()
    def to_quant_linear(self, dtype: Optional[torch.dtype] = None,
                        scale_dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """Pack the calibrated weight: a QuantLinear whose output matches this layer's (up to the rounding of
        the scales to `scale_dtype`, when given: the codes are then fitted to the rounded scales)."""
        W = self.base_weight()
        if self.lora_in_grid:
            W = W + self.grid_delta()  # the low-rank update becomes part of the codes
        q, s, z = ref.lwc_quantize(W, self.hi, self.lo, self.spec.bits, self.spec.group_size, self.spec.symmetric,
                                   scale_dtype)
        packed = pack_weight(q, s, z, self.spec, dtype=dtype or self.weight.dtype)
        lora = (None, None) if self.lora_in_grid else (self.lora_A, self.lora_B)
        sparse = None if self.reserved is None else outliers.to_csr(self.weight, self.reserved)
        return QuantLinear(packed, self.bias, *lora, self.lora_alpha, self.spec, sparse=sparse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, lora_rank={self.lora_rank}, lora_in_grid={self.lora_in_grid}")


class DenseLinear(nn.Linear):
    """An nn.Linear that runs through `ops.dense_linear`: the float layers a quantized model keeps (its LM head)
    decode on the CPU with saliq's dense GEMV; everything else (autograd, prefill, other devices) is F.linear."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.dense_linear(x, self.weight, self.bias)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "DenseLinear":
        """A DenseLinear holding the very parameters of `linear` (tied weights stay tied)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new


def use_dense_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` (in a saliq model: the LM head) a DenseLinear sharing its parameters;
    returns how many were replaced."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, DenseLinear.sharing(getattr(holder, child)))
    return len(names)


def _after_load_state_dict(module, incompatible_keys):
    module.finish_loading()


class QuantLinear(nn.Module):
    """Inference linear on a packed 2/3/4-bit weight (format v1), with optional LoRA, bias and reserved weights.

    Buffers (all tensors, safe to save as safetensors): qweight, qweight_hi, scales, zeros, and bias,
    lora_A, lora_B when present; with reserved weights (saliq/outliers.py) their CSR form sparse_rowptr
    int32 [N+1], sparse_cols int16/int32 [nnz], sparse_values 16-bit [nnz], which replace the dequantized weight
    at those positions: y = x What^T + x C^T with C = value - What there (fp32, derived, not saved).

    On the CPU, qweight and qweight_hi hold their words in the CPU word order (1-D, saliq/word_order.py), which
    one core streams from memory faster; state_dict(), `packed` and a move to another device give format v1.
    """

    def __init__(self, packed: PackedWeight, bias: Optional[Tensor] = None, lora_A: Optional[Tensor] = None,
                 lora_B: Optional[Tensor] = None, lora_alpha: float = 16.0, spec: Optional[QuantSpec] = None,
                 sparse: Optional[tuple] = None):
        super().__init__()
        self.spec = spec or QuantSpec(bits=packed.bits, group_size=packed.group_size)
        if (self.spec.bits, self.spec.group_size) != (packed.bits, packed.group_size):
            raise ValueError(f"spec {self.spec} does not match the packed weight "
                             f"(bits={packed.bits}, group_size={packed.group_size})")
        validate.packed_args(packed)  # once here; forward trusts the buffers
        self.in_features, self.out_features = packed.in_features, packed.out_features
        for name, t in packed.tensors().items():
            self.register_buffer(name, t.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("lora_A", None if lora_A is None else lora_A.detach().clone())
        self.register_buffer("lora_B", None if lora_B is None else lora_B.detach().clone())
        self.lora_rank = 0 if lora_A is None else lora_A.shape[0]
        self.lora_alpha = lora_alpha
        self.lora_scale = lora_alpha / self.lora_rank if self.lora_rank else 0.0
        self.reserved = 0
        self._sparse_slices = None  # the corrections in slices of 16 rows for the CPU kernel, made on first use
        if sparse is not None:
            rowptr, cols, values = sparse
            if not rowptr.is_meta:
                validate.reserved_weights(rowptr, cols, values, self.out_features, self.in_features)
            self.reserved = int(values.numel())
            self.register_buffer("sparse_rowptr", rowptr.detach().clone())
            self.register_buffer("sparse_cols", cols.detach().clone())
            self.register_buffer("sparse_values", values.detach().clone())
            # derived, not saved: int32 columns and the fp32 corrections the sparse op adds
            self.register_buffer("sparse_cols_i32", None, persistent=False)
            self.register_buffer("sparse_correction", None, persistent=False)
            if not rowptr.is_meta:
                self.refresh_sparse()
        self._use_cpu_word_order_on_cpu()
        # the corrections derive from loaded buffers: load_state_dict (resume, user code) refreshes them
        self.register_load_state_dict_post_hook(_after_load_state_dict)

    def _words_v1(self) -> tuple[Tensor, Tensor]:
        """qweight, qweight_hi in format v1 (a copy where the layer keeps the CPU word order)."""
        if not word_order.is_cpu_order(self.qweight):
            return self.qweight, self.qweight_hi
        return word_order.to_v1(self.qweight, self.qweight_hi, self.spec.bits, self.in_features, self.out_features)

    def _set_word_order(self, cpu: bool) -> None:
        # the conversion is plain torch: it runs on any device, the meta device too; a layer whose planes are on
        # different devices is part-way through a load, and is ordered when it finishes (finish_loading)
        if word_order.is_cpu_order(self.qweight) == cpu or self.qweight.device != self.qweight_hi.device:
            return
        if cpu:
            self.qweight, self.qweight_hi = word_order.to_cpu_order(self.qweight, self.qweight_hi, self.spec.bits)
        else:
            self.qweight, self.qweight_hi = self._words_v1()

    def _use_cpu_word_order_on_cpu(self) -> None:
        self._set_word_order(self.qweight.device.type == "cpu")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if word_order.is_cpu_order(self.qweight):  # checkpoints hold format v1
            destination[prefix + "qweight"], destination[prefix + "qweight_hi"] = self._words_v1()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._set_word_order(False)  # a state dict holds format v1; finish_loading (the post hook) orders it again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # A pickle (torch.save of a whole module, copy.deepcopy) holds format v1 as a checkpoint does: the CPU word
    # order is the running build's own layout, and a later build may lay its words out differently.
    _PICKLED_V1 = "_saliq_pickled_format_v1"

    def __getstate__(self):
        state = super().__getstate__()
        if word_order.is_cpu_order(self.qweight):
            state["_buffers"] = dict(state["_buffers"])
            state["_buffers"]["qweight"], state["_buffers"]["qweight_hi"] = self._words_v1()
        state[self._PICKLED_V1] = True
        return state

    def __setstate__(self, state):
        state = dict(state)
        pickled_v1 = state.pop(self._PICKLED_V1, False)
        super().__setstate__(state)
        if not pickled_v1 and self.spec.bits == 3 and word_order.is_cpu_order(self.qweight):
            # pickled by an earlier saliq in its CPU word order: the 3-bit layout of that order changed, and the
            # words do not say which one they are in
            raise ValueError("this 3-bit QuantLinear was pickled by an earlier saliq in its in-memory CPU word "
                             "order, whose 3-bit layout has changed since: load the model's saliq checkpoint "
                             "instead (saliq.hf.load_model)")
        self._use_cpu_word_order_on_cpu()

    def refresh_sparse(self) -> None:
        """Recompute the corrections value - What at the reserved positions (after the buffers were loaded)."""
        if not self.reserved:
            return
        rowptr = self.sparse_rowptr.long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=rowptr.device), rowptr.diff())
        cols = self.sparse_cols.long()
        # What at the reserved positions only, (q - z) * s in fp32 as ref.dequantize computes it
        group = cols // self.spec.group_len(self.in_features)
        q = codes_at(*self._words_v1(), self.spec.bits, rows, cols).float()
        what = (q - self.zeros[group, rows].float()) * self.scales.float()[group, rows]
        self.sparse_cols_i32 = cols.to(torch.int32)
        self.sparse_correction = self.sparse_values.float() - what
        self._sparse_slices = None

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .cuda() convert every float buffer, the fp32 corrections too, and keep the CPU slices of the
        # old device: derive them again from the converted buffers (against the new scales, in fp32). The words
        # move as they are; on the new device they take its order (the CPU word order on the CPU, else format v1),
        # so a dtype change on the CPU converts nothing.
        out = super()._apply(fn, *args, **kwargs)
        self._use_cpu_word_order_on_cpu()
        # only a layer whose corrections were derived (a complete one: not mid-load, nothing on the meta device)
        if self.reserved and self.sparse_correction is not None and not any(
                t.is_meta for t in (self.qweight, self.qweight_hi, self.scales, self.zeros, self.sparse_rowptr,
                                    self.sparse_cols, self.sparse_values)):
            self.refresh_sparse()
        return out

    def finish_loading(self, check: bool = False) -> None:
        """After buffers were filled from a checkpoint: widen zero points stored as 4-bit pairs or int8 to the int16
        the kernels read, derive the sparse corrections, and put the words of a layer on the CPU in the CPU word
        order (last: the corrections read the loaded format-v1 words as they are, not a copy). check: first
        validate the packed weight, bias and LoRA as the kernels will trust them (ValueError), on the words as
        loaded (after the reordering `packed` would be a copy of them)."""
        if self.zeros.dtype == torch.uint8:
            self.zeros = storage.unpack_nibbles(self.zeros, self.spec.num_groups(self.in_features))
        elif self.zeros.dtype != torch.int16:
            self.zeros = self.zeros.to(torch.int16)
        if check:
            x = torch.empty((1, self.in_features), dtype=self.scales.dtype, device=self.qweight.device)
            validate.packed_linear_args(x, self.packed, self.bias, self.lora_A, self.lora_B)
        self.refresh_sparse()
        self._use_cpu_word_order_on_cpu()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec,
                    scale_dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """Round-to-nearest quantization of an nn.Linear (scales rounded to `scale_dtype` first when given)."""
        W = linear.weight.detach()
        spec.group_len(W.shape[1])  # a group size that does not divide in_features: a clear error here
        validate.quantizable_weight("linear.weight", W)
        q, s, z = ref.rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric, scale_dtype)
        return cls(pack_weight(q, s, z, spec, dtype=W.dtype), linear.bias, spec=spec)

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False, lora_rank: int = 0,
              lora_alpha: float = 16.0, dtype: torch.dtype = torch.float16, device=None, reserved: int = 0,
              zeros_storage: str = "int16", reserved_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """A module with correctly shaped (uninitialised) buffers, ready for load_state_dict (then finish_loading).
        reserved: the number of reserved weights; zeros_storage ("uint4", "int8", "int16") and reserved_dtype: as
        a checkpoint stores them (saliq/storage.py)."""
        shapes = expected_shapes(spec.bits, spec.group_size, in_features, out_features)
        mk = lambda shape, dt: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        packed = PackedWeight(qweight=mk(shapes["qweight"], torch.int32),
                              qweight_hi=mk(shapes["qweight_hi"], torch.int32),
                              scales=mk(shapes["scales"], dtype), zeros=mk(shapes["zeros"], torch.int16),
                              bits=spec.bits, group_size=spec.group_size, in_features=in_features,
                              out_features=out_features)
        lora_A = mk((lora_rank, in_features), dtype) if lora_rank else None
        lora_B = mk((out_features, lora_rank), dtype) if lora_rank else None
        sparse = None
        if reserved:
            col_dtype = torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
            sparse = (mk((out_features + 1,), torch.int32), mk((reserved,), col_dtype), mk((reserved,), reserved_dtype))
            if sparse[0].device.type != "meta":  # a valid placeholder (all in the last row); the load overwrites it
                for t in sparse:
                    t.zero_()
                sparse[0][-1] = reserved
        q = cls(packed, mk((out_features,), dtype) if bias else None, lora_A, lora_B, lora_alpha, spec, sparse)
        if zeros_storage == "uint4":
            q.zeros = mk(((shapes["zeros"][0] + 1) // 2, out_features), torch.uint8)
        elif zeros_storage != "int16":
            q.zeros = q.zeros.to(getattr(torch, zeros_storage))
        return q

    @property
    def sparse(self) -> Optional[tuple]:
        return (self.sparse_rowptr, self.sparse_cols, self.sparse_values) if self.reserved else None

    @property
    def packed(self) -> PackedWeight:
        """The weight in format v1 (on the CPU a copy of the words, which the layer keeps in the CPU word order)."""
        qweight, qweight_hi = self._words_v1()
        return PackedWeight(qweight=qweight, qweight_hi=qweight_hi, scales=self.scales,
                            zeros=self.zeros, bits=self.spec.bits, group_size=self.spec.group_size,
                            in_features=self.in_features, out_features=self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        # buffers straight from the dict: nn.Module attribute lookup costs ~0.7 us per buffer, and a decode step
        # of a small model calls hundreds of these layers
        b = self._buffers
        scales, qweight = b["scales"], b["qweight"]
        if x.dtype != scales.dtype:
            x = x.to(scales.dtype)
        sparse = None
        if self.reserved:  # the reserved weights, added into the packed matmul's output
            corr = b["sparse_correction"]
            slices = self._sparse_slices
            if slices is None and corr.device.type == "cpu" and not torch.compiler.is_compiling():
                slices = self._sparse_slices = csr_slices(b["sparse_rowptr"], b["sparse_cols_i32"], corr,
                                                          self.in_features)
            if slices is not None and slices.vals.device != corr.device:
                slices = None
            # the CSR was checked when the layer was built or loaded
            sparse = (b["sparse_rowptr"], b["sparse_cols_i32"], corr, slices)
        if x.dim() == 0 or x.shape[-1] != self.in_features or x.device != qweight.device:
            # the full checks, for their clear error
            y = ops.packed_linear(x, self.packed, b["bias"], b["lora_A"], b["lora_B"], self.lora_scale)
            if sparse is not None:
                y2 = ops.sparse_addmm_trusted_(y.reshape(-1, self.out_features), x.reshape(-1, self.in_features),
                                               *sparse)
                y = y2.reshape(y.shape)
            return y
        # the buffers were checked when the module was built: straight to the kernel
        return ops.packed_linear_trusted(x, qweight, b["qweight_hi"], scales, b["zeros"], self.spec.bits,
                                         self.spec.group_size, self.in_features, b["bias"], b["lora_A"], b["lora_B"],
                                         self.lora_scale, sparse)

    def dequantized_weight(self) -> Tensor:
        """What, with the reserved weights in place."""
        w = ops.dequantize(self.packed)
        if self.reserved:
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device),
                                           self.sparse_rowptr.long().diff())
            w = w.index_put((rows, self.sparse_cols.long()), self.sparse_values.to(w.dtype))
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, lora_rank={self.lora_rank}, reserved={self.reserved}")
