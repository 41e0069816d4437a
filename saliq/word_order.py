"""The CPU word order of the packed planes (docs/FORMAT.md, "CPU word order").

Format v1 keeps a plane as int32 [rows, N]. A CPU GEMV walks one panel of 64 inputs (a few word rows) across its
columns, which in format v1 reads that many runs N words apart at once; one core streams that from DRAM 1.3-1.6x
slower than one straight run (docs/NOTES.md). The CPU word order stores the same words, 1-D, band by band (the
word rows of 64 inputs: 4 rows of 2-bit words, 8 of 4-bit words, 2 of the 3-bit hi plane), each band 16 columns
at a time:

    word (r, n) at  b0 N + n0 h + (r - b0) w + (n - n0)
    b0 = band floor(r / band), h = min(band, rows - b0), n0 = 16 floor(n / 16), w = min(16, N - n0)

3-bit planes are also re-packed (docs/FORMAT.md, "3-bit codes in the CPU word order"): per word row of 16 inputs, byte
b of a column's low word holds codes 4b and 4b + 1 whole and the low two bits of code 4b + 3, nibble b of the row's
16 hi bits code 4b + 2 whole and the third bit of code 4b + 3. The same 48 bits; the integer kernels then take each
code with one or two operations instead of joining two planes for every code.

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


def _i32(v: int) -> int:
    """A 32-bit mask as the int32 value with its bits (torch takes no larger scalar for an int32 tensor)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _spread_nibbles(h: torch.Tensor) -> torch.Tensor:
    """16 bits -> nibble b in the low half of byte b."""
    h = (h | (h << 8)) & 0x00FF00FF
    return (h | (h << 4)) & 0x0F0F0F0F


def _gather_nibbles(t: torch.Tensor) -> torch.Tensor:
    """Inverse of _spread_nibbles: the low half of byte b (the high half zero) -> nibble b of 16 bits."""
    t = (t | (t >> 4)) & 0x00FF00FF
    return (t | (t >> 8)) & 0xFFFF


def _repack3(lo: torch.Tensor, hi: torch.Tensor, into_cpu_layout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """3-bit planes in format v1's bit layout <-> the CPU layout (_repack3_torch): saliq._C's loop on the CPU where it
    is built (a layer's words are converted when it loads: 11008 x 4096 in ~5 ms against ~15 ms in torch), torch on any
    other device (the meta device too)."""
    if lo.device.type == "cpu":
        try:
            from . import _C
        except ImportError:
            _C = None
        if _C is not None:
            return _C.repack3(lo, hi, into_cpu_layout)
    return _repack3_torch(lo, hi, into_cpu_layout)


def _repack3_torch(lo: torch.Tensor, hi: torch.Tensor, into_cpu_layout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """3-bit planes in format v1's bit layout <-> the CPU layout, both as [rows, N] / [ceil(rows / 2), N] int32 (new
    tensors). Format v1: code k of a word row has its low bits at bits 2k..2k+1 of the low word and its third bit at bit
    k of the row's 16 hi bits (bits 16 (r % 2) .. of hi word r / 2). The CPU layout, per byte b (codes c_j of inputs
    4b + j): low word byte b = c_0 | c_1 << 3 | (c_3 & 3) << 6, hi nibble b = c_2 | (c_3 >> 2) << 3. Either way bits 6-7
    of each byte and bit 3 of each nibble stay put; the rest move. In int32 (every right shift is masked after it, so
    the sign bits it brings in never count), the even and the odd word rows in turn, a chunk of rows at a time."""
    rows = lo.shape[0]
    lo_out, hi_out = torch.empty_like(lo), torch.zeros_like(hi)
    step = max(2, _CHUNK_WORDS // max(1, lo.shape[1]) // 2 * 2)  # whole hi words per chunk
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for half in (0, 1):  # the word rows whose hi bits are the low / high half of their hi word
            w = lo[r0 + half:r1:2]
            hi_rows = hi_out[r0 // 2:r0 // 2 + w.shape[0]]
            h = (hi[r0 // 2:r0 // 2 + w.shape[0]] >> (16 * half)) & 0xFFFF
            s = _spread_nibbles(h)  # nibble b of the row's hi bits in bits 0..3 of byte b
            if into_cpu_layout:  # s: format v1's third bits of codes 4b .. 4b + 3
                w_new = ((w & _i32(0xC3C3C3C3)) | ((w & 0x0C0C0C0C) << 1) | ((s & 0x01010101) << 2)
                         | ((s & 0x02020202) << 4))
                h_new = (h & 0xCCCC) | _gather_nibbles((w >> 4) & 0x03030303)
            else:  # s: c_2 and c_3's third bit
                w_new = (w & _i32(0xC3C3C3C3)) | ((w >> 1) & 0x0C0C0C0C) | ((s & 0x03030303) << 4)
                h_new = (h & 0xCCCC) | _gather_nibbles(((w >> 2) & 0x01010101) | ((w >> 4) & 0x02020202))
            lo_out[r0 + half:r1:2] = w_new
            hi_rows |= h_new << (16 * half)
    return lo_out, hi_out


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
    """(qweight, qweight_hi) in format v1 -> both planes in the CPU word order, 3-bit codes re-packed (new tensors;
    the empty qweight_hi of 2- and 4-bit as it is)."""
    if bits != 3:
        return plane_to_cpu_order(qweight, plane_widths(bits)[0]), qweight_hi
    lo, hi = _repack3(qweight.contiguous(), qweight_hi.contiguous(), into_cpu_layout=True)
    return plane_to_cpu_order(lo, 2), plane_to_cpu_order(hi, 1)


def to_v1(qweight: torch.Tensor, qweight_hi: torch.Tensor, bits: int, in_features: int,
          out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_cpu_order."""
    lo = plane_to_v1(qweight, plane_widths(bits)[0], in_features, out_features)
    if bits != 3:
        return lo, qweight_hi
    return _repack3(lo, plane_to_v1(qweight_hi, 1, in_features, out_features), into_cpu_layout=False)
