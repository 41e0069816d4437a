"""y = x What^T (+ bias) (+ lora_scale (x A^T) B^T) with What decoded on the fly from packed format v1.

Computes saliq.ref.packed_matmul (and ref.packed_linear when the LoRA term is given): fp32 accumulation,
output in x's dtype. One kernel, three regimes picked by a launch configuration:
- GEMV (decode, M <= 8): no tl.dot; each program owns BLOCK_N outputs of every row and a 1/SPLIT_K share of
  K, multiplies by broadcasting and sums over K in registers. The packed weight is the dominant traffic,
  so the grid splits K (SPLIT_K > 1) until the GPU is full.
- split-K / GEMM (M > 8): the decoded [BLOCK_K, BLOCK_N] tile feeds tl.dot in the activation dtype with an
  fp32 accumulator, grouped tile order for L2 reuse (Triton matmul tutorial).
- dequantize + F.linear (prefill): the dequantize kernel writes What once, cuBLAS does the matmul.
With SPLIT_K > 1 every split writes its fp32 partial tile and a second kernel sums the splits in a fixed
order and applies the epilogue: deterministic, no atomics. The epilogue adds the bias and the LoRA term
(x A^T is a tiny [M, r] product computed first, scaled; its product with B is fused here).
Which regime and which tile sizes run is measured per GPU, shape and bucket of M (autotune.choose).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import autotune
from .common import alloc, is_interpreter, next_pow2
from .dequantize import _dequant_tile, dequantize_into


@triton.jit
def _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, xa_ptr, lb_ptr, R,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    if HAS_LORA:
        # acc += (lora_scale x A^T) [M, R] @ B^T [R, N], in fp32
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            lb = tl.load(lb_ptr + offs_n[None, :] * R + offs_r[:, None],
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if USE_DOT:
                acc = tl.dot(xa, lb, acc, input_precision="ieee")
            else:
                acc += tl.sum(xa[:, :, None] * lb[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _packed_matmul_kernel(x_ptr, qw_ptr, qh_ptr, sc_ptr, zr_ptr, bias_ptr, xa_ptr, lb_ptr, y_ptr, part_ptr,
                          M, N, K, R, stride_xm,
                          BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                          GROUP_M: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr):
    # grouped tile order: GROUP_M row tiles sweep the same weight columns while they sit in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # each split owns a whole number of BLOCK_K tiles, so tiles stay aligned with the groups
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_row + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qh_ptr, sc_ptr, zr_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, BITS, GROUP,
                          BLOCK_K)
        if USE_DOT:
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                # tensor cores in the activation dtype, fp32 accumulator
                acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)

    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        acc = _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, xa_ptr, lb_ptr, R, HAS_BIAS, HAS_LORA,
                        USE_DOT, BLOCK_R)
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        part = part_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, xa_ptr, lb_ptr, y_ptr, M, N, R,
                          SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    # fixed summation order over the splits: the same bits on every run
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    idx = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + idx, mask=mask, other=0.0)
    acc = _epilogue(acc, offs_m, offs_n, mask_m, mask_n, bias_ptr, xa_ptr, lb_ptr, R, HAS_BIAS, HAS_LORA,
                    USE_DOT, BLOCK_R)
    tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- configs
def _cfg(kind, BM=1, BN=64, BK=64, SK=1, GM=8, warps=4, stages=2):
    return dict(kind=kind, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK, GROUP_M=GM, num_warps=warps,
                num_stages=stages)


def candidates(M: int, group: int, K: int) -> list[dict]:
    """Launch configurations to measure for M rows; the first is the default (interpreter, no tuning)."""
    bm = next_pow2(M)
    if is_interpreter():
        # few, large programs: the interpreter pays per program and per loop step, not per element
        if M <= 8:
            # BLOCK_K a power of two (tl.arange): a per-channel group of K = 100 takes 128, scales per element
            return [_cfg("gemv", BM=bm, BN=64, BK=min(128, next_pow2(group) if group > 0 else 128), SK=2)]
        if M <= 16:
            return [_cfg("gemm", BM=16, BN=64, BK=64, SK=2)]
        return [_cfg("gemm", BM=min(64, bm), BN=64, BK=64, SK=1)]
    cands = []
    if M <= 8:
        for bn, bk, sk, w in ((64, 128, 4, 4), (32, 128, 8, 4), (128, 64, 2, 4), (64, 64, 8, 4), (32, 64, 16, 2),
                              (128, 128, 1, 8), (64, 128, 2, 4), (256, 32, 4, 8)):
            cands.append(_cfg("gemv", BM=bm, BN=bn, BK=bk, SK=sk, warps=w))
    if 4 <= M <= 64:
        for bn, bk, sk in ((64, 64, 4), (128, 64, 2), (64, 128, 8), (32, 64, 8), (128, 128, 4)):
            cands.append(_cfg("gemm", BM=16 if M <= 16 else min(64, bm), BN=bn, BK=bk, SK=sk, warps=4, stages=3))
    if M > 16:
        for bm_, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                   (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)):
            cands.append(_cfg("gemm", BM=min(bm_, max(16, bm)), BN=bn, BK=bk, SK=1, warps=w, stages=st))
        cands.append(_cfg("dequant"))
    # the broadcast product of a GEMV step lives in registers: bound BLOCK_M * BLOCK_K * BLOCK_N
    cands = [c for c in cands if c["kind"] != "gemv" or c["BLOCK_M"] * c["BLOCK_K"] * c["BLOCK_N"] <= 16384
             * c["num_warps"] // 4]
    if not cands:
        cands = [_cfg("gemv", BM=bm, BN=32, BK=32, SK=8)]
    # dedupe, keeping the first occurrence
    seen, out = set(), []
    for c in cands:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------- launchers
def _run(cfg, x, qweight, qh, scales, zeros, bits, group_size, K, bias, xa, lb, y):
    M, N = x.shape[0], qweight.shape[1]
    R = 0 if xa is None else xa.shape[1]
    group = K if group_size == -1 else group_size
    if cfg["kind"] == "dequant":
        # prefill: decode once into the activation dtype, then cuBLAS (fp32 accumulation)
        W = dequantize_into(torch.empty((N, K), dtype=x.dtype, device=x.device), qweight, qh, scales, zeros,
                            bits, group_size, K)
        out = F.linear(x, W, bias)
        if xa is not None:
            out = torch.addmm(out, xa.to(x.dtype), lb.to(x.dtype).t())
        return out
    use_dot = cfg["kind"] == "gemm"
    dot_fp32 = x.dtype == torch.float32 or is_interpreter()  # the interpreter's fp16/bf16 maths is not exact
    block_r = 16
    split = cfg["SPLIT_K"]
    # no more splits than K tiles
    split = max(1, min(split, triton.cdiv(K, cfg["BLOCK_K"])))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    dummy = y
    _packed_matmul_kernel[grid](
        x, qweight, qh, scales, zeros, dummy if bias is None else bias, dummy if xa is None else xa,
        dummy if lb is None else lb, y, part, M, N, K, R, x.stride(0),
        BITS=bits, GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        SPLIT_K=split, GROUP_M=cfg["GROUP_M"], USE_DOT=use_dot, DOT_FP32=dot_fp32,
        HAS_BIAS=bias is not None, HAS_LORA=xa is not None, BLOCK_R=block_r,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        bm_r = cfg["BLOCK_M"] if use_dot else min(cfg["BLOCK_M"], 16)
        bn_r = 64
        reduce_dot = use_dot and bm_r >= 16
        _splitk_reduce_kernel[(triton.cdiv(N, bn_r), triton.cdiv(M, bm_r))](
            part, dummy if bias is None else bias, dummy if xa is None else xa, dummy if lb is None else lb, y,
            M, N, R, SPLIT_K=split, BLOCK_M=bm_r, BLOCK_N=bn_r, HAS_BIAS=bias is not None,
            HAS_LORA=xa is not None, USE_DOT=reduce_dot, BLOCK_R=block_r, num_warps=4)
    return y


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, bits: int, group_size: int, in_features: int,
                  bias: Optional[torch.Tensor] = None, lora_A: Optional[torch.Tensor] = None,
                  lora_B: Optional[torch.Tensor] = None, lora_scale: float = 0.0,
                  config: Optional[dict] = None) -> torch.Tensor:
    """y = x What^T + lora_scale (x A^T) B^T + bias for x [M, K]; output [M, N] in x.dtype.

    `config` forces a launch configuration (one of `candidates(...)`' dicts); by default it is measured per
    GPU, shape and bucket of M and cached (autotune.choose)."""
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[1]
    group = K if group_size == -1 else group_size
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    qh = qweight_hi.contiguous() if bits == 3 else qweight
    bias = None if bias is None else bias.contiguous()
    xa = lb = None
    if lora_A is not None:
        # the rank-r product x A^T is tiny; its product with B is fused into the epilogue
        xa = (x.float() @ lora_A.float().t()).mul_(lora_scale).contiguous()
        lb = lora_B.contiguous()
    y = alloc((M, N), x.dtype, x.device)
    if M == 0:
        return y

    def run(cfg):
        return _run(cfg, x, qweight, qh, scales, zeros, bits, group_size, K, bias, xa, lb, y)

    if config is not None:
        return run(config)
    key = (bits, group_size, N, K, str(x.dtype).replace("torch.", ""), autotune.m_bucket(M), xa is not None)
    cands = candidates(M, group, K)
    config = autotune.choose("packed_matmul", key, cands, run, x.device)
    memo = None
    if _replacement:
        memo = (x.device.type, x.device.index, key, tuple(sorted(config.items())))
        config = _replacement.get(memo, config)
    try:
        return run(config)
    except triton.OutOfResources:
        # The default (untuned) configuration can exceed the GPU's shared memory: the pipeliner stages the
        # x tile and the [BLOCK_K, BLOCK_N] word / scale / zero tiles of the decode, e.g. 288 KiB on sm_90
        # (limit 227 KiB) for fp32 x, 3-bit, group 32, 128 x 128 x 64, 3 stages. Triton raises before
        # launching; take the first candidate that launches, as the measured choice would, and remember it.
        for cfg in cands:
            if cfg == config:
                continue
            try:
                out = run(cfg)
            except triton.OutOfResources:
                continue
            _replacement[memo or (x.device.type, x.device.index, key, tuple(sorted(config.items())))] = cfg
            return out
        raise


# (device, key, chosen configuration) -> the candidate that replaces it because it did not fit the GPU
_replacement: dict = {}


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, qweight_hi: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, bits: int, group_size: int, in_features: int,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton saliq.ref.packed_matmul: y = x W^T + bias, fp32 accumulation, output in x.dtype."""
    return packed_linear(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias)
