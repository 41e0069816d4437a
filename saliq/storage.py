"""How a checkpoint stores a model's tensors (checkpoint format 2, docs/FORMAT.md "Storage"), and the size they
count to: every tensor in the smallest form that holds it exactly, non-quantized float tensors in 16 bits.

- zero points: two per byte ("uint4", consecutive groups of a column, the even one in the low nibble) when they
  all lie in [0, 15], as min-max and clipped groups that straddle zero give; else int8 when they fit; else int16;
- scales: fp16 when every scale is an fp16 value (calibration rounds them so, `CalibConfig.scale_dtype`), else as
  they are;
- reserved weights: 16-bit already;
- float tensors (embeddings, norms, LoRA factors, biases): fp16, or bf16 for a tensor beyond fp16's range, unless
  the caller keeps full precision (`float_bits=32`); `save` then rounds the model in memory to the stored values,
  so the model it leaves behind is the model on disk;
- packed codes and CSR indices: as they are."""
from __future__ import annotations

import torch
from torch import Tensor, nn

FLOAT_BITS = (16, 32)
_FP16_MAX = 65504.0


def _fits(t: Tensor, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return t.numel() == 0 or (int(t.min()) >= info.min and int(t.max()) <= info.max)


def _exact_in(t: Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).to(t.dtype), t))


def float16_form(t: Tensor) -> Tensor:
    """t in 16 bits: fp16 where its values fit, else bf16 (fp32 range)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t
    finite = t[torch.isfinite(t)]
    if finite.numel() and float(finite.abs().max()) > _FP16_MAX:
        return t.to(torch.bfloat16)
    return t.to(torch.float16)


def stored_form(name: str, t: Tensor, float_bits: int = 16) -> Tensor:
    """The tensor `name` of a saliq model's state dict as the checkpoint stores it."""
    if float_bits not in FLOAT_BITS:
        raise ValueError(f"float_bits={float_bits} is not supported; allowed: {FLOAT_BITS}")
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "zeros":
        if t.numel() and int(t.min()) >= 0 and int(t.max()) <= 15:
            return pack_nibbles(t)
        return t.to(torch.int8) if _fits(t, torch.int8) else t
    if leaf == "scales":
        return t.to(torch.float16) if t.dtype != torch.float16 and _exact_in(t, torch.float16) else t
    if leaf == "sparse_values" or not t.is_floating_point():
        return t
    return float16_form(t) if float_bits == 16 else t


def pack_nibbles(z: Tensor) -> Tensor:
    """Zero points [G, N] in [0, 15] -> uint8 [ceil(G / 2), N]: groups 2i and 2i + 1 in the low / high nibble."""
    g, n = z.shape
    padded = torch.zeros((g + 1) // 2 * 2, n, dtype=torch.uint8, device=z.device)
    padded[:g] = z.to(torch.uint8)
    return padded[0::2] | (padded[1::2] << 4)


def unpack_nibbles(packed: Tensor, groups: int) -> Tensor:
    """Inverse of pack_nibbles: -> int16 [groups, N]."""
    both = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1, packed.shape[1])
    return both[:groups].to(torch.int16)


def zeros_storage_name(t: Tensor) -> str:
    """The `zeros_dtype` a module entry records for stored zero points."""
    return "uint4" if t.dtype == torch.uint8 else str(t.dtype).removeprefix("torch.")


def stored_state(tensors: dict, float_bits: int = 16) -> dict:
    return {k: stored_form(k, v, float_bits) for k, v in tensors.items()}


@torch.no_grad()
def round_model_to(model: nn.Module, stored: dict) -> None:
    """Make the model's float tensors hold exactly the stored values (in their own dtype)."""
    own = dict(model.state_dict(keep_vars=True))
    for k, v in stored.items():
        t = own.get(k)
        if t is not None and t.is_floating_point() and v.dtype != t.dtype:
            t.copy_(v.to(t.dtype))


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


_PARTS = {"qweight": "codes", "qweight_hi": "codes", "scales": "scales", "zeros": "zeros",
          "sparse_rowptr": "reserved", "sparse_cols": "reserved", "sparse_values": "reserved",
          "lora_A": "lora", "lora_B": "lora", "bias": "bias"}


def bits_report(modules: dict, stored: dict) -> dict:
    """Bits per quantized weight of the QuantLinear layers `modules` {name: module}, from their stored tensors
    `stored` {full tensor name: tensor}: per part (codes, scales, zeros, reserved, lora, bias) and in all."""
    weights = sum(m.in_features * m.out_features for m in modules.values())
    parts = dict.fromkeys(("codes", "scales", "zeros", "reserved", "lora", "bias"), 0)
    for name in modules:
        for leaf, part in _PARTS.items():
            t = stored.get(f"{name}.{leaf}")
            if t is not None:
                parts[part] += nbytes(t)
    total = sum(parts.values())
    out = {f"{k}_bits": 8 * v / weights for k, v in parts.items()}
    out.update(bits_per_weight=8 * total / weights, quantized_weights=weights, bytes=total)
    return out
