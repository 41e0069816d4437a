"""An independent composite of LWC fake quantization, written the way ApiQ / OmniQuant write it:
round_ste and torch autograd. The reference's closed-form gradients are tested against it."""
import torch


def round_ste(x):
    return (x.round() - x).detach() + x


def omniquant_fake_quant(W, hi, lo, bits, group_size, symmetric):
    n, k = W.shape
    g = k if group_size == -1 else group_size
    x = W.reshape(-1, g)
    xmin = x.amin(-1, keepdim=True)
    xmax = x.amax(-1, keepdim=True)
    xmax = torch.sigmoid(hi.reshape(-1, 1)) * xmax
    xmin = torch.sigmoid(lo.reshape(-1, 1)) * xmin
    if symmetric:
        abs_max = torch.max(xmax.abs(), xmin.abs())
        scale = (abs_max / (2 ** (bits - 1) - 1)).clamp(min=1e-5, max=1e4)
        zero_point = (2 ** (bits - 1) - 1) * torch.ones_like(scale)
    else:
        scale = (xmax - xmin) / (2**bits - 1)
        # saliq's rule for degenerate groups (docs/FORMAT.md): s >= max(|xmax|, |xmin|) / 2^13, no gradient there
        floor = (torch.max(xmax.abs(), xmin.abs()) * 2.0**-13).clamp(min=1e-5, max=1e4).detach()
        scale = torch.where(scale < floor, floor, scale).clamp(max=1e4)
        zero_point = -xmin / scale
    round_zero_point = zero_point.clamp(min=-1e4, max=1e4).round()
    x_int = (round_ste(x / scale) + round_zero_point).clamp(0, 2**bits - 1)
    return ((x_int - round_zero_point) * scale).reshape(n, k)
