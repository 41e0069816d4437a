"""Drop-in linear layers: FakeQuantLinear for calibration, QuantLinear for inference on packed weights."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, ref, validate
from .packing import PackedWeight, expected_shapes, pack_weight
from .spec import QuantSpec


class FakeQuantLinear(nn.Module):
    """A linear layer under calibration: frozen W, learnable clipping logits hi/lo, LoRA A/B.

    y = x What^T + (alpha / r) (x A^T) B^T + bias, What = fake_quant_lwc(W, hi, lo). When a saliency S is
    set, the same fused pass also yields the penalty sum S (Weff - W)^2, stored in `self.penalty`.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], spec: QuantSpec, lora_rank: int = 64,
                 lora_alpha: float = 16.0, init_logit: float = 4.0):
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, lora_rank: int = 64, lora_alpha: float = 16.0,
                    init_logit: float = 4.0) -> "FakeQuantLinear":
        return cls(linear.weight, linear.bias, spec, lora_rank, lora_alpha, init_logit)

    def set_saliency(self, S: Optional[Tensor], after_lora: bool = False) -> None:
        """Attach the saliency S [N, K] (None detaches it); after_lora puts the LoRA update in Weff."""
        if S is not None and tuple(S.shape) != (self.out_features, self.in_features):
            raise ValueError(f"S has shape {tuple(S.shape)}; expected {(self.out_features, self.in_features)}")
        if S is not None:
            validate.saliency_values("S", S)
        self.saliency = None if S is None else S.to(device=self.weight.device, dtype=torch.float32).contiguous()
        self.after_lora = after_lora
        self.penalty = None

    def lora_delta(self) -> Optional[Tensor]:
        return None if self.lora_A is None else self.lora_scale * (self.lora_B @ self.lora_A)

    def _quantize(self, with_penalty: bool):
        if with_penalty and self.saliency is None:
            raise RuntimeError("no saliency set: call set_saliency(S) first")
        if not with_penalty:
            return ops.fake_quant_lwc(self.weight, self.hi, self.lo, self.spec), None
        delta = self.lora_delta() if self.after_lora else None
        return ops.fake_quant_lwc(self.weight, self.hi, self.lo, self.spec, S=self.saliency, delta=delta)

    def quantized_weight(self) -> Tensor:
        """What, differentiable in hi and lo."""
        return self._quantize(False)[0]

    def compute_penalty(self) -> Tensor:
        """sum S (Weff - W)^2 without a forward pass (the weight-only stage)."""
        return self._quantize(True)[1]

    def forward(self, x: Tensor) -> Tensor:
        what, self.penalty = self._quantize(self.saliency is not None)
        y = F.linear(x, what, self.bias)
        if self.lora_A is not None:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    @torch.no_grad()
    def to_quant_linear(self, dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """Pack the calibrated weight: a QuantLinear whose output matches this layer's."""
        q, s, z = ref.lwc_quantize(self.weight, self.hi, self.lo, self.spec.bits, self.spec.group_size,
                                   self.spec.symmetric)
        packed = pack_weight(q, s, z, self.spec, dtype=dtype or self.weight.dtype)
        return QuantLinear(packed, self.bias, self.lora_A, self.lora_B, self.lora_alpha, self.spec)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, lora_rank={self.lora_rank}")


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


class QuantLinear(nn.Module):
    """Inference linear on a packed 2/3/4-bit weight (format v1), with optional LoRA and bias.

    Buffers (all tensors, safe to save as safetensors): qweight, qweight_hi, scales, zeros, and bias,
    lora_A, lora_B when present.
    """

    def __init__(self, packed: PackedWeight, bias: Optional[Tensor] = None, lora_A: Optional[Tensor] = None,
                 lora_B: Optional[Tensor] = None, lora_alpha: float = 16.0, spec: Optional[QuantSpec] = None):
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        """Round-to-nearest quantization of an nn.Linear."""
        W = linear.weight.detach()
        spec.group_len(W.shape[1])  # a group size that does not divide in_features: a clear error here
        validate.quantizable_weight("linear.weight", W)
        q, s, z = ref.rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric)
        return cls(pack_weight(q, s, z, spec, dtype=W.dtype), linear.bias, spec=spec)

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False, lora_rank: int = 0,
              lora_alpha: float = 16.0, dtype: torch.dtype = torch.float16, device=None) -> "QuantLinear":
        """A module with correctly shaped (uninitialised) buffers, ready for load_state_dict."""
        shapes = expected_shapes(spec.bits, spec.group_size, in_features, out_features)
        mk = lambda shape, dt: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        packed = PackedWeight(qweight=mk(shapes["qweight"], torch.int32),
                              qweight_hi=mk(shapes["qweight_hi"], torch.int32),
                              scales=mk(shapes["scales"], dtype), zeros=mk(shapes["zeros"], torch.int16),
                              bits=spec.bits, group_size=spec.group_size, in_features=in_features,
                              out_features=out_features)
        lora_A = mk((lora_rank, in_features), dtype) if lora_rank else None
        lora_B = mk((out_features, lora_rank), dtype) if lora_rank else None
        return cls(packed, mk((out_features,), dtype) if bias else None, lora_A, lora_B, lora_alpha, spec)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(qweight=self.qweight, qweight_hi=self.qweight_hi, scales=self.scales,
                            zeros=self.zeros, bits=self.spec.bits, group_size=self.spec.group_size,
                            in_features=self.in_features, out_features=self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        # buffers straight from the dict: nn.Module attribute lookup costs ~0.7 us per buffer, and a decode step
        # of a small model calls hundreds of these layers
        b = self._buffers
        scales, qweight = b["scales"], b["qweight"]
        if x.dtype != scales.dtype:
            x = x.to(scales.dtype)
        if x.dim() == 0 or x.shape[-1] != self.in_features or x.device != qweight.device:
            # the full checks, for their clear error
            return ops.packed_linear(x, self.packed, b["bias"], b["lora_A"], b["lora_B"], self.lora_scale)
        # the buffers were checked when the module was built: straight to the kernel
        return ops.packed_linear_trusted(x, qweight, b["qweight_hi"], scales, b["zeros"], self.spec.bits,
                                         self.spec.group_size, self.in_features, b["bias"], b["lora_A"], b["lora_B"],
                                         self.lora_scale)

    def dequantized_weight(self) -> Tensor:
        return ops.dequantize(self.packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, lora_rank={self.lora_rank}")
