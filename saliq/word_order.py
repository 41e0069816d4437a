"""The CPU word order of the packed planes (docs/FORMAT.md, "CPU word order").

Format v1 keeps a plane as int32 [rows, N]. A CPU GEMV walks one panel of 64 inputs (a few word rows) across its
columns, which in format v1 reads that many runs N words apart at once; one core streams that from DRAM 1.3-1.6x
slower than one straight run (docs/NOTES.md). The CPU word order stores the same words, 1-D, band by band (the
word rows of 64 inputs: 4 rows of 2-bit words, 8 of 4-bit words, 2 of the 3-bit hi plane), each band 16 columns
at a time:

    word (r, n) at  b0 N + n0 h + (r - b0) w + (n - n0)
    b0 = band floor(r / band), h = min(band, rows - b0), n0 = 16 floor(n / 16), w = min(16, N - n0)

A QuantLinear on the CPU keeps its words in this order; its state_dict, `packed` and every other device see
format v1. The 1-D shape is the marker: a 2-D plane is format v1.
"""
from __future__ import annotations

import torch

from .packing import packed_rows, plane_widths

# words converted per step: bounds the temporary a conversion needs besides its output
_CHUNK_WORDS = 1 << 22


def band_rows(width: int) -> int:
    """Word rows per band of a plane whose codes are `width` bits: the rows of 64 inputs."""
    return 64 // (32 // width)


def _bands(rows: int, n: int, band: int):
    """(b0, b1, h): runs of whole bands of h rows each over rows [b0, b1), then the short last band."""
    full = rows // band * band
    step = max(1, _CHUNK_WORDS // max(1, band * n)) * band
    for b0 in range(0, full, step):
        yield b0, min(full, b0 + step), band
    if full < rows:
        yield full, rows, rows - full


def _strips(v1: torch.Tensor, flat: torch.Tensor, n: int, h: int):
    """The two views of one run of bands, v1 [nb, h, N] and the CPU order [nb, h N], split at the last whole strip
    of 16 columns: ((v1 whole strips as [nb, S, h, 16], CPU order's), (v1 tail [nb, h, w], CPU order's))."""
    nb = v1.shape[0]
    n16 = n // 16 * 16
    whole = (v1[:, :, :n16].view(nb, h, n16 // 16, 16).permute(0, 2, 1, 3),
             flat[:, :n16 * h].view(nb, n16 // 16, h, 16))
    tail = (v1[:, :, n16:], flat[:, n16 * h:].view(nb, h, n - n16))
    return whole, tail


def _copy_words(v1: torch.Tensor, flat: torch.Tensor, width: int, into_cpu_order: bool) -> None:
    """Copy a plane between format v1 [rows, N] and the CPU word order [rows * N] (both contiguous), a run of bands
    at a time."""
    rows, n = v1.shape
    for b0, b1, h in _bands(rows, n, band_rows(width)):
        nb = (b1 - b0) // h
        for v1_part, cpu_part in _strips(v1[b0:b1].view(nb, h, n), flat[b0 * n:b1 * n].view(nb, h * n), n, h):
            if into_cpu_order:
                cpu_part.copy_(v1_part)
            else:
                v1_part.copy_(cpu_part)


def plane_to_cpu_order(words: torch.Tensor, width: int) -> torch.Tensor:
    """A plane in format v1, int32 [rows, N], -> the same words in the CPU word order, int32 [rows * N]."""
    out = torch.empty(words.numel(), dtype=words.dtype, device=words.device)
    _copy_words(words.contiguous(), out, width, into_cpu_order=True)
    return out


def plane_to_v1(flat: torch.Tensor, width: int, in_features: int, n: int) -> torch.Tensor:
    """Inverse of plane_to_cpu_order: int32 [rows * N] -> [rows, N] (rows from in_features and width)."""
    rows = packed_rows(in_features, width)
    if flat.dim() != 1 or flat.numel() != rows * n:
        raise ValueError(f"a plane in the CPU word order must be 1-D with {rows} x {n} = {rows * n} words, "
                         f"got shape {tuple(flat.shape)}")
    out = torch.empty(rows, n, dtype=flat.dtype, device=flat.device)
    _copy_words(out, flat, width, into_cpu_order=False)
    return out


def is_cpu_order(qweight: torch.Tensor) -> bool:
    return qweight.dim() == 1


def to_cpu_order(qweight: torch.Tensor, qweight_hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, qweight_hi) in format v1 -> both planes in the CPU word order (new tensors; the empty qweight_hi
    of 2- and 4-bit as it is)."""
    widths = plane_widths(bits)
    lo = plane_to_cpu_order(qweight, widths[0])
    return lo, plane_to_cpu_order(qweight_hi, 1) if bits == 3 else qweight_hi


def to_v1(qweight: torch.Tensor, qweight_hi: torch.Tensor, bits: int, in_features: int,
          out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_cpu_order."""
    widths = plane_widths(bits)
    lo = plane_to_v1(qweight, widths[0], in_features, out_features)
    return lo, plane_to_v1(qweight_hi, 1, in_features, out_features) if bits == 3 else qweight_hi
