"""Packed weight format v1 (docs/FORMAT.md is the normative description).

Integers q in [0, 2**bits - 1] of a weight W [N, K] are packed along K into int32 words, N contiguous:
  2-bit: qweight int32 [ceil(K/16), N], element (k, n) at bits 2*(k % 16) of word [k // 16, n]
  4-bit: qweight int32 [ceil(K/8), N],  element (k, n) at bits 4*(k % 8)  of word [k // 8, n]
  3-bit: qweight holds the low 2 bits in the 2-bit layout, qweight_hi int32 [ceil(K/32), N] the third
         bit at bit (k % 32) of word [k // 32, n].
Padding elements past K are zero. Scales [G, N] are in the activation dtype, zeros [G, N] are int16.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .spec import QuantSpec

FORMAT_VERSION = 1
ZERO_DTYPE = torch.int16
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes that hold a `bits`-bit integer (3-bit = 2-bit plane + 1-bit plane)."""
    return {2: (2,), 3: (2, 1), 4: (4,)}[bits]


def packed_rows(in_features: int, width: int) -> int:
    """Rows of int32 words that hold `in_features` values of `width` bits."""
    per_word = 32 // width
    return -(-in_features // per_word)


def pack_plane(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack integers [N, K] (each < 2**width) into int32 words [ceil(K*width/32), N]."""
    per_word = 32 // width
    n, k = values.shape
    rows = packed_rows(k, width)
    v = torch.zeros(n, rows * per_word, dtype=torch.int64, device=values.device)
    v[:, :k] = values.to(torch.int64)
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * width
    words = (v.view(n, rows, per_word) << shifts).sum(-1)
    # reinterpret the unsigned 32-bit pattern as int32 (two's complement)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).t().contiguous()


def unpack_plane(words: torch.Tensor, width: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_plane: int32 [rows, N] -> uint8 [N, in_features]."""
    per_word = 32 // width
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * width
    v = (w.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return v.reshape(w.shape[0], -1)[:, :in_features].to(torch.uint8)


def codes_at(qweight: torch.Tensor, qweight_hi: torch.Tensor, bits: int, rows: torch.Tensor,
             cols: torch.Tensor) -> torch.Tensor:
    """The integers q[rows, cols] (int64) of a packed weight, read from their words alone (no full unpack)."""
    def plane(words, width):
        per_word = 32 // width
        w = words[cols // per_word, rows].to(torch.int64) & 0xFFFFFFFF
        return (w >> (width * (cols % per_word))) & ((1 << width) - 1)

    rows, cols = rows.long(), cols.long()
    if bits == 3:
        return plane(qweight, 2) | (plane(qweight_hi, 1) << 2)
    return plane(qweight, bits)


def pack(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack integers q [N, K] in [0, 2**bits - 1] -> (qweight, qweight_hi); qweight_hi is empty unless 3-bit."""
    QuantSpec(bits=bits)  # validates bits
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [out_features, in_features], got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise ValueError(f"q must hold integers, got dtype {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > (1 << bits) - 1):
        raise ValueError(
            f"q holds values in [{int(q.min())}, {int(q.max())}]; {bits}-bit allows [0, {(1 << bits) - 1}]"
        )
    if bits == 3:
        return pack_plane(q & 3, 2), pack_plane(q >> 2, 1)
    return pack_plane(q, bits), torch.empty(0, dtype=torch.int32, device=q.device)


def unpack(qweight: torch.Tensor, qweight_hi: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack: -> uint8 [N, in_features]."""
    if bits == 3:
        return unpack_plane(qweight, 2, in_features) | (unpack_plane(qweight_hi, 1, in_features) << 2)
    return unpack_plane(qweight, bits, in_features)


@dataclass
class PackedWeight:
    """A quantized weight in format v1: packed integers plus per-group scales and zero points."""

    qweight: torch.Tensor
    qweight_hi: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        validate_packed(self)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size)

    @property
    def group_len(self) -> int:
        return self.spec.group_len(self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def expected_shapes(bits: int, group_size: int, in_features: int, out_features: int) -> dict[str, tuple]:
    spec = QuantSpec(bits=bits, group_size=group_size)
    widths = plane_widths(bits)
    groups = spec.num_groups(in_features)
    return {
        "qweight": (packed_rows(in_features, widths[0]), out_features),
        "qweight_hi": (packed_rows(in_features, 1), out_features) if bits == 3 else (0,),
        "scales": (groups, out_features),
        "zeros": (groups, out_features),
    }


def validate_packed(p: PackedWeight) -> None:
    """Check that a PackedWeight is internally consistent; raise ValueError naming what is wrong."""
    if p.format_version != FORMAT_VERSION:
        raise ValueError(f"format_version={p.format_version} is not supported; this saliq reads {FORMAT_VERSION}")
    shapes = expected_shapes(p.bits, p.group_size, p.in_features, p.out_features)
    for name, shape in shapes.items():
        t = getattr(p, name)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; a {p.bits}-bit, group {p.group_size} weight of "
                f"[{p.out_features}, {p.in_features}] needs {shape}"
            )
    for name in ("qweight", "qweight_hi"):
        if getattr(p, name).dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {getattr(p, name).dtype}")
    if p.scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be one of {SCALE_DTYPES}, got {p.scales.dtype}")
    if p.zeros.dtype != ZERO_DTYPE:
        raise ValueError(f"zeros must be {ZERO_DTYPE}, got {p.zeros.dtype}")
    devices = {t.device for t in (p.qweight, p.scales, p.zeros)}
    if len(devices) != 1:
        raise ValueError(f"packed tensors are on different devices: {sorted(map(str, devices))}")


def pack_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
                dtype: Optional[torch.dtype] = None) -> PackedWeight:
    """Pack integers q [N, K] with per-group scales and zeros given as [N, G] into a PackedWeight."""
    n, k = q.shape
    qweight, qweight_hi = pack(q, spec.bits)
    dtype = dtype or scales.dtype
    return PackedWeight(
        qweight=qweight,
        qweight_hi=qweight_hi,
        scales=scales.t().to(dtype).contiguous(),
        zeros=zeros.t().round().to(ZERO_DTYPE).contiguous(),
        bits=spec.bits,
        group_size=spec.group_size,
        in_features=k,
        out_features=n,
    )
