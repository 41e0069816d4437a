"""Dequantization of packed format v1 (docs/FORMAT.md) to W [N, K]: saliq.ref.dequantize.

`_dequant_tile` is the decode shared with the matmul kernels: it turns a [BLOCK_K, BLOCK_N] tile of the
packed layout (K along the packed words, N contiguous) into fp32 (q - z) * s, exactly as the reference.
3-bit reads the 2-bit plane through the same code as 2-bit, plus one bit from the 1-bit plane.

Work split of the dequantize kernel: a 2-D grid of [BLOCK_K, BLOCK_N] tiles; each program reads its
packed words once (coalesced along N) and writes its tile of W transposed into the [N, K] output. On a GPU,
`dequantize_into` also tries saliq._C's CUDA kernel (one thread per packed word, 16-byte stores) and keeps the
faster (per-GPU tuning cache).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .common import alloc, is_interpreter


@triton.jit
def _dequant_tile(qw_ptr, qh_ptr, sc_ptr, zr_ptr, k0, offs_k, offs_n, mask_k, mask_n, N,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    mask = mask_k[:, None] & mask_n[None, :]
    col = offs_n[None, :]
    if BITS == 4:
        word = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + col, mask=mask, other=0)
        q = (word >> ((offs_k % 8) * 4)[:, None]) & 15
    else:
        # 2-bit plane (also the low plane of 3-bit); the arithmetic shift of a negative word is fine:
        # the mask keeps only the wanted bits
        word = tl.load(qw_ptr + (offs_k // 16)[:, None] * N + col, mask=mask, other=0)
        q = (word >> ((offs_k % 16) * 2)[:, None]) & 3
        if BITS == 3:
            hword = tl.load(qh_ptr + (offs_k // 32)[:, None] * N + col, mask=mask, other=0)
            q = q | (((hword >> (offs_k % 32)[:, None]) & 1) << 2)
    if GROUP % BLOCK_K == 0:
        # the tile lies inside one group (tiles start at multiples of BLOCK_K): one row of scales
        grp = k0 // GROUP
        s = tl.load(sc_ptr + grp * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        z = tl.load(zr_ptr + grp * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    else:
        grp = (offs_k // GROUP)[:, None] * N + col
        s = tl.load(sc_ptr + grp, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zr_ptr + grp, mask=mask, other=0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _dequantize_kernel(qw_ptr, qh_ptr, sc_ptr, zr_ptr, w_ptr, N, K,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = _dequant_tile(qw_ptr, qh_ptr, sc_ptr, zr_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, BITS, GROUP,
                      BLOCK_K)
    out = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    tl.store(out, w.to(w_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# No fp contraction: (q - z) * s rounds twice, as the reference's two torch ops (see fake_quant.EXACT_OPTIONS).
EXACT_OPTIONS = dict(enable_fp_fusion=False)


def _candidates() -> list[dict]:
    if is_interpreter():
        return [dict(BLOCK_K=64, BLOCK_N=64, num_warps=4)]
    return [dict(BLOCK_K=64, BLOCK_N=64, num_warps=4), dict(BLOCK_K=128, BLOCK_N=64, num_warps=4),
            dict(BLOCK_K=64, BLOCK_N=128, num_warps=8), dict(BLOCK_K=32, BLOCK_N=128, num_warps=4)]


def _cuda_kernel():
    """saliq._C's CUDA dequantize kernel (csrc/cuda/dequantize.cu, one thread per packed word), or None where
    saliq._C was built without CUDA."""
    try:
        from .. import cpp_backend
    except ImportError:
        return None
    return cpp_backend.cuda_dequantize_into if cpp_backend.WITH_CUDA else None


def candidates_for(out: torch.Tensor) -> list[dict]:
    """Launch configurations of dequantize_into for this output: on a GPU saliq._C's CUDA kernel first (it needs
    no compilation), then the Triton ones."""
    cuda_first = out.is_cuda and not is_interpreter() and _cuda_kernel() is not None
    return ([dict(kind="cuda")] if cuda_first else []) + _candidates()


def run_config(cfg: dict, out: torch.Tensor, qweight, qweight_hi, scales, zeros, bits: int, group_size: int,
               in_features: int) -> None:
    """Dequantize into `out` with one configuration of candidates_for(out)."""
    if cfg.get("kind") == "cuda":
        _cuda_kernel()(out, qweight, qweight_hi, scales, zeros, bits, group_size, in_features)
        return
    K, N = in_features, qweight.shape[1]
    group = K if group_size == -1 else group_size
    qh = qweight_hi if bits == 3 else qweight  # placeholder: the 1-bit plane is only read for 3-bit
    grid = (triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _dequantize_kernel[grid](qweight, qh, scales, zeros, out, N, K, BITS=bits, GROUP=group, BLOCK_K=cfg["BLOCK_K"],
                             BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], **EXACT_OPTIONS)


def dequantize_into(out: torch.Tensor, qweight, qweight_hi, scales, zeros, bits: int, group_size: int,
                    in_features: int) -> torch.Tensor:
    """Write W [N, K] into `out` (any float dtype, contiguous); returns out. On a GPU the CUDA kernel is one
    more candidate of the tuning (tried first: it needs no compilation), so the faster of the two serves."""
    args = (qweight, qweight_hi, scales, zeros, bits, group_size, in_features)

    def run(cfg):
        run_config(cfg, out, *args)

    key = (bits, group_size, qweight.shape[1], in_features, str(out.dtype).replace("torch.", ""))
    run(autotune.choose("dequantize", key, candidates_for(out), run, out.device))
    return out


def dequantize(qweight: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Triton saliq.ref.dequantize: packed format v1 -> W [N, K] in scales.dtype."""
    out = alloc((qweight.shape[1], in_features), scales.dtype, qweight.device)
    return dequantize_into(out, qweight.contiguous(), qweight_hi.contiguous(), scales.contiguous(),
                           zeros.contiguous(), bits, group_size, in_features)
