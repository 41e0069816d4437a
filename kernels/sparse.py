"""Sparse addmm: out = y + x Sp^T for Sp [N, K] in CSR by output row (saliq.ref.sparse_addmm), the reserved
weights of a quantized layer applied after its packed matmul.

Each program owns BLOCK_N consecutive rows n and BLOCK_M rows of x: it walks the rows' nonzeros in step, the
j-th nonzero of every row at once (masked past a row's end), so each output element is an fp32 sum over its
row in CSR order, with y added and the result cast once. Deterministic: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import alloc, is_interpreter, next_pow2


@triton.jit
def _sparse_addmm_kernel(y_ptr, x_ptr, rowptr_ptr, cols_ptr, vals_ptr, out_ptr, M, N, K, nnz, stride_xm,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    m_ok = ms < M
    start = tl.load(rowptr_ptr + rows, mask=row_ok, other=0)
    end = tl.load(rowptr_ptr + rows + 1, mask=row_ok, other=0)
    # a malformed row range reads nothing (the Python layer validates the CSR)
    bad = (start < 0) | (end > nnz) | (start > end)
    start = tl.where(bad, 0, start)
    end = tl.where(bad, 0, end)
    length = end - start
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.max(length, axis=0)):
        live = j < length
        idx = start + j
        col = tl.load(cols_ptr + idx, mask=live, other=0)
        live = live & (col >= 0) & (col < K)
        val = tl.load(vals_ptr + idx, mask=live, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + ms[:, None] * stride_xm + col[None, :].to(tl.int64),
                     mask=m_ok[:, None] & live[None, :], other=0.0).to(tl.float32)
        acc += xv * val[None, :]
    offs = ms[:, None] * N + rows[None, :]
    mask = m_ok[:, None] & row_ok[None, :]
    yv = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (yv + acc).to(out_ptr.dtype.element_ty), mask=mask)


def sparse_addmm_into(y: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """y + x Sp^T written into out ([M, N] contiguous, y's dtype; may be y itself)."""
    M, K = x.shape
    N = rowptr.numel() - 1
    if x.stride(1) != 1:
        x = x.contiguous()
    y = y.contiguous()
    if M == 0 or N == 0:
        return out
    block_m = min(16, next_pow2(M))
    block_n = 16 if is_interpreter() else 64
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _sparse_addmm_kernel[grid](y, x, rowptr, cols, vals, out, M, N, K, cols.numel(), x.stride(0),
                               BLOCK_N=block_n, BLOCK_M=block_m, num_warps=4)
    return out


def sparse_addmm(y: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor, cols: torch.Tensor,
                 vals: torch.Tensor) -> torch.Tensor:
    """Triton saliq.ref.sparse_addmm: y + x Sp^T as a new [M, N] tensor in y's dtype."""
    out = alloc(y.shape, y.dtype, y.device)
    return sparse_addmm_into(y, x, rowptr, cols, vals, out)


sparse_addmm.into = sparse_addmm_into  # saliq.ops.sparse_addmm_ writes over y with it
