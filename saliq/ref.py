"""Pure-torch reference of every saliq op: the specification every backend is tested against.

Shapes: W [N, K] (out_features, in_features), G groups of g consecutive elements along K.
Group statistics and all arithmetic are in fp32; outputs are cast to the input dtype at the end.
Formulas: docs/ARCHITECTURE.md section 1.1 (LWC fake quantization, straight-through gradients) and 1.3.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import packing

SCALE_MIN, SCALE_MAX = 1e-5, 1e4
ZERO_BOUND = 1e4
# Degenerate groups (docs/FORMAT.md): an asymmetric scale is at least max(|xmax|, |xmin|) / 2^13, so
# |xmin / s| <= 2^13 and the zero point never reaches ZERO_BOUND; a constant group c >= 2^13 * SCALE_MIN
# then gets s = c / 2^13 and z = -round(c / s) and dequantizes to c exactly. A power of two keeps it exact.
SCALE_FLOOR_FACTOR = 2.0 ** -13
WEIGHT_BOUND = SCALE_MAX  # larger weights would clamp s at SCALE_MAX and zero the rest of their group


def _grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = W.shape
    g = k if group_size == -1 else group_size
    return W.float().reshape(n, k // g, g)


def scale_zero(wmax, wmin, fmax, fmin, bits: int, symmetric: bool):
    """Scale and zero point of 1.1 from group extremes and clipping factors (all [N, G] fp32).

    Returns (s, z, s_raw, s_lo, xmax, xmin): s_raw is the scale before clamping and s_lo its lower bound;
    gradients flow through s only where SCALE_MIN <= s_lo <= s_raw <= SCALE_MAX.
    """
    qmax = (1 << bits) - 1
    xmax, xmin = fmax * wmax, fmin * wmin
    if symmetric:
        half = (1 << (bits - 1)) - 1
        s_raw = torch.maximum(xmax.abs(), xmin.abs()) / half
        s_lo = torch.full_like(s_raw, SCALE_MIN)  # s_raw >= max(|xmax|, |xmin|) / 2^13 already
        s = s_raw.clamp(SCALE_MIN, SCALE_MAX)
        z = torch.full_like(s, float(half))
    else:
        s_raw = (xmax - xmin) / qmax
        s_lo = (torch.maximum(xmax.abs(), xmin.abs()) * SCALE_FLOOR_FACTOR).clamp(SCALE_MIN, SCALE_MAX)
        s = torch.minimum(torch.maximum(s_raw, s_lo), torch.full_like(s_raw, SCALE_MAX))
        z = (-xmin / s).clamp(-ZERO_BOUND, ZERO_BOUND).round()
    return s, z, s_raw, s_lo, xmax, xmin


def lwc_quantize(W, hi, lo, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: Optional[torch.dtype] = None):
    """Integer levels of LWC quantization: q [N, K] (int64), s [N, G], z [N, G] (fp32).

    scale_dtype: round each scale to this dtype first, then fit the zero point and the levels to the rounded
    scale, so a checkpoint storing s in that dtype holds exactly the weights it describes (docs/FORMAT.md,
    "Storage"). None keeps the fp32 scale."""
    Wg = _grouped(W, group_size)
    s, z, _, _, _, xmin = scale_zero(Wg.amax(-1), Wg.amin(-1), torch.sigmoid(hi.float()),
                                     torch.sigmoid(lo.float()), bits, symmetric)
    if scale_dtype is not None:
        s = s.to(scale_dtype).float()
        if not symmetric:
            z = (-xmin / s).clamp(-ZERO_BOUND, ZERO_BOUND).round()
    q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, (1 << bits) - 1)
    return q.reshape(W.shape).to(torch.int64), s, z


def rtn_quantize(W, bits: int, group_size: int, symmetric: bool, scale_dtype: Optional[torch.dtype] = None):
    """Round-to-nearest: LWC with no clipping (both factors 1). Returns q [N, K], s [N, G], z [N, G]."""
    ones = torch.ones(W.shape[0], W.shape[1] // (W.shape[1] if group_size == -1 else group_size),
                      device=W.device)
    inf = torch.full_like(ones, float("inf"))  # sigmoid(inf) = 1 exactly
    return lwc_quantize(W, inf, inf, bits, group_size, symmetric, scale_dtype)


def rtn_dequantized(W, bits: int, group_size: int, symmetric: bool):
    """What [N, K] (fp32) of round-to-nearest quantization: (q - z) * s with the fp32 scale."""
    q, s, z = rtn_quantize(W, bits, group_size, symmetric)
    n, k = W.shape
    g = k if group_size == -1 else group_size
    return ((q.float().reshape(n, -1, g) - z[..., None]) * s[..., None]).reshape(n, k)


def _forward_parts(W, hi, lo, bits, group_size, symmetric):
    Wg = _grouped(W, group_size)
    wmax, wmin = Wg.amax(-1), Wg.amin(-1)
    fmax, fmin = torch.sigmoid(hi.float()), torch.sigmoid(lo.float())
    s, z, s_raw, s_lo, xmax, xmin = scale_zero(wmax, wmin, fmax, fmin, bits, symmetric)
    u = Wg / s[..., None]
    r = torch.round(u)
    t = r + z[..., None]
    q = t.clamp(0, (1 << bits) - 1)
    what = (q - z[..., None]) * s[..., None]
    return dict(Wg=Wg, wmax=wmax, wmin=wmin, fmax=fmax, fmin=fmin, s=s, z=z, s_raw=s_raw, s_lo=s_lo, xmax=xmax,
                xmin=xmin, u=u, r=r, t=t, q=q, what=what)


def fake_quant_lwc_fwd(W, hi, lo, S: Optional[torch.Tensor], delta: Optional[torch.Tensor],
                       bits: int, group_size: int, symmetric: bool):
    """Forward of LWC fake quantization with the optional fused saliency term.

    Returns (What [N, K] in W.dtype, reg fp32 scalar), reg = sum S * (What + delta - W)^2 with What in fp32
    (delta omitted when None; reg = 0 when S is None).
    """
    p = _forward_parts(W, hi, lo, bits, group_size, symmetric)
    what = p["what"].reshape(W.shape)
    if S is None:
        reg = torch.zeros((), dtype=torch.float32, device=W.device)
    else:
        weff = what if delta is None else what + delta.float()
        reg = (S.float() * (weff - W.float()) ** 2).sum()
    return what.to(W.dtype), reg


def fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits: int, group_size: int,
                       symmetric: bool, need_dW: bool):
    """Closed-form backward of fake_quant_lwc_fwd (straight-through estimator, 1.1).

    Returns (dW or None, dhi, dlo, ddelta or None).
    """
    p = _forward_parts(W, hi, lo, bits, group_size, symmetric)
    shape3 = p["Wg"].shape
    g_what = grad_what.float().reshape(shape3)
    g_reg_w = None
    if S is not None:
        weff = p["what"] if delta is None else p["what"] + delta.float().reshape(shape3)
        g_reg_w = 2.0 * grad_reg.float() * S.float().reshape(shape3) * (weff - p["Wg"])
        g_what = g_what + g_reg_w
    qmax = (1 << bits) - 1
    inrange = (p["t"] >= 0) & (p["t"] <= qmax)
    dwhat_ds = torch.where(inrange, p["r"] - p["u"], p["q"] - p["z"][..., None])
    g_s = (g_what * dwhat_ds).sum(-1) * ((p["s_raw"] >= p["s_lo"]) & (p["s_raw"] <= SCALE_MAX))
    if symmetric:
        g_abs = g_s / ((1 << (bits - 1)) - 1)
        amax, amin = p["xmax"].abs(), p["xmin"].abs()
        share_max = torch.where(amax > amin, 1.0, torch.where(amax == amin, 0.5, 0.0))
        d_xmax = g_abs * share_max * torch.sign(p["xmax"])
        d_xmin = g_abs * (1.0 - share_max) * torch.sign(p["xmin"])
    else:
        d_xmax, d_xmin = g_s / qmax, -g_s / qmax
    dhi = (d_xmax * p["wmax"] * p["fmax"] * (1 - p["fmax"])).to(hi.dtype)
    dlo = (d_xmin * p["wmin"] * p["fmin"] * (1 - p["fmin"])).to(lo.dtype)
    ddelta = None if (delta is None or S is None) else g_reg_w.reshape(W.shape).to(delta.dtype)
    if delta is not None and ddelta is None:
        ddelta = torch.zeros_like(delta)
    dW = None
    if need_dW:
        Wg = p["Wg"]
        dW = g_what * inrange
        if g_reg_w is not None:
            dW = dW - g_reg_w
        # amax / amin spread their gradient evenly over ties, as torch's autograd does
        is_max = (Wg == p["wmax"][..., None]).float()
        is_min = (Wg == p["wmin"][..., None]).float()
        dW = dW + is_max * (d_xmax * p["fmax"] / is_max.sum(-1))[..., None]
        dW = dW + is_min * (d_xmin * p["fmin"] / is_min.sum(-1))[..., None]
        dW = dW.reshape(W.shape).to(W.dtype)
    return dW, dhi, dlo, ddelta


def saliency_sq_error(A, B, S: Optional[torch.Tensor], need_grad: bool):
    """sum S * (A - B)^2 in fp32 (plain sum of squares when S is None).

    Returns (loss fp32 scalar, dloss/dA in A.dtype or None); dloss/dB is its negation.
    """
    diff = A.float() - B.float()
    weighted = diff if S is None else S.float() * diff
    loss = (weighted * diff).sum()
    grad = (2.0 * weighted).to(A.dtype) if need_grad else None
    return loss, grad


def dequantize(qweight, qweight_hi, scales, zeros, bits: int, group_size: int, in_features: int):
    """Packed format v1 -> W [N, K] in scales.dtype: (q - z) * s computed in fp32."""
    q = packing.unpack(qweight, qweight_hi, bits, in_features).float()
    n = q.shape[0]
    g = in_features if group_size == -1 else group_size
    s = scales.float().t().reshape(n, -1, 1)
    z = zeros.float().t().reshape(n, -1, 1)
    return ((q.reshape(n, -1, g) - z) * s).reshape(n, in_features).to(scales.dtype)


def packed_matmul(x, qweight, qweight_hi, scales, zeros, bits: int, group_size: int, in_features: int,
                  bias: Optional[torch.Tensor]):
    """y = x W^T + bias for x [M, K], W dequantized from format v1; fp32 accumulation, output in x.dtype."""
    W = dequantize(qweight, qweight_hi, scales.float(), zeros, bits, group_size, in_features)
    y = x.float() @ W.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_linear(x, packed: "packing.PackedWeight", bias=None, lora_A=None, lora_B=None, lora_scale=0.0):
    """y = x What^T + lora_scale (x A^T) B^T + bias for x [..., K]."""
    x2 = x.reshape(-1, packed.in_features)
    y = packed_matmul(x2, packed.qweight, packed.qweight_hi, packed.scales, packed.zeros, packed.bits,
                      packed.group_size, packed.in_features, bias)
    if lora_A is not None:
        y = y + (lora_scale * ((x2.float() @ lora_A.float().t()) @ lora_B.float().t())).to(y.dtype)
    return y.reshape(*x.shape[:-1], packed.out_features)


def dense_linear(x, weight, bias=None):
    """y = x W^T + bias for a float W [N, K] (a quantized model's float layers, e.g. its LM head): F.linear."""
    return torch.nn.functional.linear(x, weight, bias)


def sparse_addmm(y, x, rowptr, cols, vals):
    """out = y + x Sp^T for x [M, K], y [M, N] (x's dtype) and a sparse Sp [N, K] in CSR by output row: rowptr int32
    [N + 1], cols int32 [nnz], vals fp32 [nnz] (repeated (row, column) entries add up). fp32 products and sums,
    y added in fp32, one cast to y's dtype at the end."""
    n = rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=x.device), rowptr.long().diff(), output_size=cols.numel())
    terms = x.float()[:, cols.long()] * vals.float()  # [M, nnz]: x[m, cols[j]] * vals[j]
    sums = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device).index_add_(1, rows, terms)
    return (y.float() + sums).to(y.dtype)
