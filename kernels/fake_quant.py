"""LWC fake quantization (docs/ARCHITECTURE.md 1.1) with the fused saliency term: forward and backward kernels.

Computes exactly saliq.ref.fake_quant_lwc_fwd / fake_quant_lwc_bwd (fp32 inside, outputs cast at the end).

Work split: W [N, K] is viewed as R = N * G group rows of g contiguous elements (groups are consecutive
along K, so group row r = n * G + j starts at element r * g, and hi, lo [N, G] are indexed by r too). Each
program owns BLOCK_R whole group rows, so the group statistics (max, min, scale, zero point) and the
per-group gradient sums (dhi, dlo) stay in registers: every input is read once and every output written
once, with no full-size temporaries and no atomics. The saliency sum is reduced to one partial per program
and the partials are summed in a fixed order (common.sum_partials): the result is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import autotune
from .common import alloc, is_interpreter, next_pow2, sum_partials

@triton.jit
def _round_half_even(x):
    # torch.round: to nearest, ties to even, the sign of x kept (-0.3 -> -0.0). For |x| < 2^23, |x| + 2^23 lies
    # in [2^23, 2^24), where the fp32 spacing is 1, so that one rounded add (ties to even, and 2^23 is even)
    # rounds |x| to an integer and the subtraction is exact; |x| >= 2^23 (and inf) is already integral. Three
    # float operations and a sign copy, instead of two floors and a tie test (x + 0.5 would round 0.49999997 up).
    a = tl.abs(x)
    m = (a + 8388608.0) - 8388608.0
    m = tl.where(a < 8388608.0, m, a)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (m.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _div_by_int(x, D: tl.constexpr, INV_D: tl.constexpr, TORCH_RECIP: tl.constexpr):
    """x / D for a Python-int divisor D, rounded as torch rounds `tensor / int` on the tensors' device: CUDA
    torch multiplies by the fp32 reciprocal INV_D = fl(1 / D) (BinaryDivTrueKernel.cu, "a * reciprocal(b)"
    for a CPU-scalar divisor), CPU torch divides (IEEE, as div_rn)."""
    if TORCH_RECIP:
        return x * INV_D
    else:
        return tl.div_rn(x, tl.full(x.shape, D, tl.float32))


@triton.jit
def _div_rows(w, s, FMA_DIV: tl.constexpr):
    """w / s[:, None], rounded as an IEEE division (div_rn). FMA_DIV (GPU builds): s's reciprocal y = 1 / s
    (div_rn) once per row, then per element q = w y, the exact residual e = w - q s (fma) and q + e y (fma),
    which is the correctly rounded quotient when y is (Markstein's theorem; no overflow, and a normal residual,
    |w| >= 2^-102: below that the tiny quotient may differ in its last bits, which round() discards). Three
    instructions an element instead of div.rn.f32's ~8 and its slow-path branch. The interpreter has no fused
    multiply-add (numpy rounds the product), so it divides."""
    if FMA_DIV:
        y = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)[:, None]
        q = w * y
        e = tl.fma(-q, s[:, None], w)
        return tl.fma(e, y, q)
    else:
        return tl.div_rn(w, tl.broadcast_to(s[:, None], w.shape))


@triton.jit
def _group_quant(w, mask, fmax, fmin, QMAX: tl.constexpr, HALF: tl.constexpr, INV_QMAX: tl.constexpr,
                 INV_HALF: tl.constexpr, TORCH_RECIP: tl.constexpr, FMA_DIV: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Group statistics and the quantization of w [BLOCK_R, BLOCK_G] (fp32), as ref._forward_parts
    (the clamp bounds 1e-5, 1e4 are ref.SCALE_MIN, SCALE_MAX and ref.ZERO_BOUND; 2^-13 is
    ref.SCALE_FLOOR_FACTOR).

    Every fp32 operation rounds once, as torch's separate eager ops do: the kernels are compiled without
    fp contraction (EXACT_OPTIONS: fmax * wmax - fmin * wmin would otherwise become one fma), divisions by
    tensors are IEEE (div_rn) and divisions by Q or 2^(b-1) - 1 follow torch (_div_by_int). A one-ulp error
    in s moves every What of the group, and in w / s it moves elements across a rounding tie."""
    wmax = tl.max(tl.where(mask, w, float("-inf")), axis=1)
    wmin = tl.min(tl.where(mask, w, float("inf")), axis=1)
    # rows past R (fully masked) get 0 instead of -inf / inf, so they compute no NaN
    wmax = tl.where(wmax == float("-inf"), 0.0, wmax)
    wmin = tl.where(wmin == float("inf"), 0.0, wmin)
    xmax = fmax * wmax
    xmin = fmin * wmin
    if SYMMETRIC:
        s_raw = _div_by_int(tl.maximum(tl.abs(xmax), tl.abs(xmin)), HALF, INV_HALF, TORCH_RECIP)
        s_lo = tl.full(s_raw.shape, 1e-5, tl.float32)
        s = tl.minimum(tl.maximum(s_raw, 1e-5), 1e4)
        z = tl.full(s.shape, HALF, tl.float32)
    else:
        s_raw = _div_by_int(xmax - xmin, QMAX, INV_QMAX, TORCH_RECIP)
        # degenerate groups: s >= max(|xmax|, |xmin|) / 2^13 (ref.SCALE_FLOOR_FACTOR; exact, a power of two)
        s_lo = tl.minimum(tl.maximum(tl.maximum(tl.abs(xmax), tl.abs(xmin)) * 0.0001220703125, 1e-5), 1e4)
        s = tl.minimum(tl.maximum(s_raw, s_lo), 1e4)
        z = _round_half_even(tl.minimum(tl.maximum(tl.div_rn(-xmin, s), -1e4), 1e4))
    u = _div_rows(w, s, FMA_DIV)
    r = _round_half_even(u)
    t = r + z[:, None]
    q = tl.minimum(tl.maximum(t, 0.0), QMAX * 1.0)
    what = (q - z[:, None]) * s[:, None]
    return wmax, wmin, xmax, xmin, s_raw, s_lo, s, z, u, r, t, q, what


@triton.jit
def _group_tile(pid, R, g, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    """Program pid's BLOCK_R group rows of g contiguous elements (of R): row indices, which rows exist, the
    element mask and the element offsets of the [BLOCK_R, BLOCK_G] tile. EVEN (BLOCK_R divides R and
    g == BLOCK_G, see tiles_are_even): the masks are constants, which the compiler folds away with every
    select and predicate they feed."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    if EVEN:
        row_ok = tl.full((BLOCK_R,), 1, tl.int1)
        mask = tl.full((BLOCK_R, BLOCK_G), 1, tl.int1)
    else:
        row_ok = rows < R
        mask = row_ok[:, None] & (cols < g)[None, :]
    offs = rows.to(tl.int64)[:, None] * g + cols[None, :]
    return rows, row_ok, mask, offs


def tiles_are_even(R: int, g: int, block_r: int, block_g: int) -> bool:
    """Whether every [block_r, block_g] tile of R group rows of g elements is whole (_group_tile's EVEN)."""
    return R % block_r == 0 and g == block_g


@triton.jit
def _fq_fwd_kernel(w_ptr, fmax_ptr, fmin_ptr, s_ptr, delta_ptr, what_ptr, partial_ptr, R, g,
                   QMAX: tl.constexpr, HALF: tl.constexpr, INV_QMAX: tl.constexpr, INV_HALF: tl.constexpr,
                   TORCH_RECIP: tl.constexpr, FMA_DIV: tl.constexpr, SYMMETRIC: tl.constexpr,
                   HAS_S: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                   EVEN: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok, mask, offs = _group_tile(pid, R, g, BLOCK_R, BLOCK_G, EVEN)
    # upcast right after the load: all arithmetic is fp32, as in the reference
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fmax = tl.load(fmax_ptr + rows, mask=row_ok, other=1.0)
    fmin = tl.load(fmin_ptr + rows, mask=row_ok, other=1.0)
    _, _, _, _, _, _, _, _, _, _, _, _, what = _group_quant(w, mask, fmax, fmin, QMAX, HALF, INV_QMAX, INV_HALF,
                                                         TORCH_RECIP, FMA_DIV, SYMMETRIC)
    tl.store(what_ptr + offs, what.to(what_ptr.dtype.element_ty), mask=mask)
    if HAS_S:
        # the penalty uses the fp32 What, before the cast to W's dtype
        sal = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        weff = what
        if HAS_DELTA:
            weff = weff + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, weff - w, 0.0)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(sal * (diff * diff), axis=1), axis=0))


@triton.jit
def _fq_bwd_kernel(gw_ptr, greg_ptr, w_ptr, fmax_ptr, fmin_ptr, s_ptr, delta_ptr,
                   dw_ptr, dhi_ptr, dlo_ptr, ddelta_ptr, R, g,
                   QMAX: tl.constexpr, HALF: tl.constexpr, INV_QMAX: tl.constexpr, INV_HALF: tl.constexpr,
                   TORCH_RECIP: tl.constexpr, FMA_DIV: tl.constexpr, SYMMETRIC: tl.constexpr,
                   HAS_S: tl.constexpr, HAS_DELTA: tl.constexpr, NEED_DW: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok, mask, offs = _group_tile(pid, R, g, BLOCK_R, BLOCK_G, EVEN)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gw = tl.load(gw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fmax = tl.load(fmax_ptr + rows, mask=row_ok, other=1.0)
    fmin = tl.load(fmin_ptr + rows, mask=row_ok, other=1.0)
    # recompute the group statistics instead of saving them: W is read anyway, and nothing full-size is kept
    wmax, wmin, xmax, xmin, s_raw, s_lo, s, z, u, r, t, q, what = _group_quant(w, mask, fmax, fmin, QMAX,
                                                                               HALF, INV_QMAX, INV_HALF,
                                                                               TORCH_RECIP, FMA_DIV, SYMMETRIC)
    if HAS_S:
        # d reg / d Weff = 2 grad_reg S (Weff - W): added to the incoming gradient of What
        sal = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        weff = what
        if HAS_DELTA:
            weff = weff + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        greg = tl.load(greg_ptr).to(tl.float32)
        g_reg_w = tl.where(mask, 2.0 * greg * sal * (weff - w), 0.0)
        gw = gw + g_reg_w
        if HAS_DELTA:
            tl.store(ddelta_ptr + offs, g_reg_w.to(ddelta_ptr.dtype.element_ty), mask=mask)
    inrange = (t >= 0.0) & (t <= QMAX * 1.0)
    # straight-through: inside the range dWhat/ds = round(u) - u, where clamped to c it is c - z
    dwhat_ds = tl.where(inrange, r - u, q - z[:, None])
    g_s = tl.sum(tl.where(mask, gw * dwhat_ds, 0.0), axis=1)
    g_s = tl.where((s_raw >= s_lo) & (s_raw <= 1e4), g_s, 0.0)
    if SYMMETRIC:
        g_abs = _div_by_int(g_s, HALF, INV_HALF, TORCH_RECIP)
        amax = tl.abs(xmax)
        amin = tl.abs(xmin)
        # torch.maximum's gradient: all to the larger, split evenly on a tie
        share = tl.where(amax > amin, 1.0, tl.where(amax == amin, 0.5, 0.0))
        d_xmax = g_abs * share * _sign(xmax)
        d_xmin = g_abs * (1.0 - share) * _sign(xmin)
    else:
        d_xmax = _div_by_int(g_s, QMAX, INV_QMAX, TORCH_RECIP)
        d_xmin = _div_by_int(-g_s, QMAX, INV_QMAX, TORCH_RECIP)
    dhi = d_xmax * wmax * fmax * (1.0 - fmax)
    dlo = d_xmin * wmin * fmin * (1.0 - fmin)
    tl.store(dhi_ptr + rows, dhi.to(dhi_ptr.dtype.element_ty), mask=row_ok)
    tl.store(dlo_ptr + rows, dlo.to(dlo_ptr.dtype.element_ty), mask=row_ok)
    if NEED_DW:
        dw = tl.where(inrange, gw, 0.0)
        if HAS_S:
            dw = dw - g_reg_w
        # amax / amin send their gradient to the extreme elements, split evenly over ties (torch autograd)
        is_max = mask & (w == wmax[:, None])
        is_min = mask & (w == wmin[:, None])
        n_max = tl.maximum(tl.sum(is_max.to(tl.float32), axis=1), 1.0)
        n_min = tl.maximum(tl.sum(is_min.to(tl.float32), axis=1), 1.0)
        dw = dw + tl.where(is_max, tl.div_rn(d_xmax * fmax, n_max)[:, None], 0.0)
        dw = dw + tl.where(is_min, tl.div_rn(d_xmin * fmin, n_min)[:, None], 0.0)
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launchers
# Compile options of both kernels: no fp contraction. By default LLVM turns fmax * wmax - fmin * wmin into
# fma(fmax, wmax, -(fmin * wmin)) and ptxas fuses any plain mul + add; torch's eager ops (the reference)
# round every intermediate. Without fusion every mul / add / sub in the PTX carries an explicit .rn, which
# ptxas never contracts. The interpreter (numpy, no contraction) ignores the option.
EXACT_OPTIONS = dict(enable_fp_fusion=False)


def _int_div_args(bits: int, device) -> dict:
    """The division constexprs: for _div_by_int and the divisors Q = 2^b - 1 and 2^(b-1) - 1 the fp32
    reciprocals (1.0f / D, computed in fp32 as torch computes them) and whether torch on `device` multiplies by
    them; for _div_rows whether the build divides through the reciprocal and two fmas (a GPU build)."""
    qmax, half = (1 << bits) - 1, (1 << (bits - 1)) - 1
    one = torch.ones((), dtype=torch.float32)
    return dict(QMAX=qmax, HALF=half, INV_QMAX=(one / qmax).item(), INV_HALF=(one / half).item(),
                TORCH_RECIP=torch.device(device).type == "cuda", FMA_DIV=not is_interpreter())


def _geometry(W: torch.Tensor, group_size: int):
    n, k = W.shape
    g = k if group_size == -1 else group_size
    return n * (k // g), g


def _candidates(g: int) -> list[dict]:
    block_g = next_pow2(g)
    if is_interpreter():
        # the interpreter pays per program, not per element: few large programs
        return [dict(BLOCK_R=max(1, 16384 // block_g), num_warps=4)]
    # each row of a tile is one group; 2-8K elements per program keeps registers in bounds
    cands = []
    for elems, warps in ((2048, 4), (4096, 8), (1024, 4), (8192, 8)):
        cands.append(dict(BLOCK_R=max(1, elems // block_g), num_warps=warps))
    return cands


def _factors(hi, lo):
    # sigmoid by torch on the tiny [N, G] logits: bit-identical to the reference's s, so no element can
    # cross a rounding tie because of a one-ulp difference in exp
    return torch.sigmoid(hi.float()).contiguous(), torch.sigmoid(lo.float()).contiguous()


def _config(op, W, g, bits, run):
    key = (bits, g, str(W.dtype).replace("torch.", ""), autotune.m_bucket(W.shape[0] * W.shape[1] // g))
    return autotune.choose(op, key, _candidates(g), run, W.device)


def fake_quant_lwc_fwd(W: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, S: Optional[torch.Tensor],
                       delta: Optional[torch.Tensor], bits: int, group_size: int, symmetric: bool):
    """Triton saliq.ref.fake_quant_lwc_fwd: returns (What in W.dtype, reg fp32 scalar)."""
    W = W.contiguous()
    R, g = _geometry(W, group_size)
    fmax, fmin = _factors(hi, lo)
    S_ = W if S is None else S.contiguous()  # placeholders: never read when the flag is off
    D_ = W if delta is None else delta.contiguous()
    what = alloc(W.shape, W.dtype, W.device)

    def run(cfg):
        grid = (triton.cdiv(R, cfg["BLOCK_R"]),)
        partials = torch.empty(grid[0], dtype=torch.float32, device=W.device) if S is not None else fmax
        _fq_fwd_kernel[grid](W, fmax, fmin, S_, D_, what, partials, R, g, **_int_div_args(bits, W.device),
                             SYMMETRIC=symmetric, HAS_S=S is not None,
                             HAS_DELTA=delta is not None and S is not None,
                             BLOCK_R=cfg["BLOCK_R"], BLOCK_G=next_pow2(g),
                             EVEN=tiles_are_even(R, g, cfg["BLOCK_R"], next_pow2(g)), num_warps=cfg["num_warps"],
                             **EXACT_OPTIONS)
        return partials

    partials = run(_config("fake_quant_fwd", W, g, bits, run))
    if S is None:
        return what, torch.zeros((), dtype=torch.float32, device=W.device)
    return what, sum_partials(partials)


def fake_quant_lwc_bwd(grad_what: torch.Tensor, grad_reg: Optional[torch.Tensor], W: torch.Tensor,
                       hi: torch.Tensor, lo: torch.Tensor, S: Optional[torch.Tensor],
                       delta: Optional[torch.Tensor], bits: int, group_size: int, symmetric: bool,
                       need_dW: bool):
    """Triton saliq.ref.fake_quant_lwc_bwd: returns (dW or None, dhi, dlo, ddelta or None)."""
    W = W.contiguous()
    grad_what = grad_what.contiguous()
    R, g = _geometry(W, group_size)
    fmax, fmin = _factors(hi, lo)
    has_s = S is not None
    S_ = W if S is None else S.contiguous()
    D_ = W if delta is None else delta.contiguous()
    if grad_reg is None:
        grad_reg = torch.zeros((), dtype=torch.float32, device=W.device)
    greg = grad_reg.reshape(1).float()
    dhi = alloc(hi.shape, hi.dtype, W.device)
    dlo = alloc(lo.shape, lo.dtype, W.device)
    dW = alloc(W.shape, W.dtype, W.device) if need_dW else None
    ddelta = None
    if delta is not None:
        ddelta = alloc(delta.shape, delta.dtype, W.device) if has_s else torch.zeros_like(delta)

    def run(cfg):
        grid = (triton.cdiv(R, cfg["BLOCK_R"]),)
        _fq_bwd_kernel[grid](grad_what, greg, W, fmax, fmin, S_, D_,
                             W if dW is None else dW, dhi, dlo, W if (ddelta is None or not has_s) else ddelta,
                             R, g, **_int_div_args(bits, W.device), SYMMETRIC=symmetric,
                             HAS_S=has_s, HAS_DELTA=delta is not None and has_s, NEED_DW=need_dW,
                             BLOCK_R=cfg["BLOCK_R"], BLOCK_G=next_pow2(g),
                             EVEN=tiles_are_even(R, g, cfg["BLOCK_R"], next_pow2(g)), num_warps=cfg["num_warps"],
                             **EXACT_OPTIONS)

    run(_config("fake_quant_bwd", W, g, bits, run))
    return dW, dhi, dlo, ddelta
