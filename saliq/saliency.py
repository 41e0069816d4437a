"""Fisher-diagonal saliency of every linear in every decoder block (docs/ARCHITECTURE.md 1.2).

S_l[n, k] = sum over calibration samples of (d loss_sample / d W_l[n, k])^2, loss_sample the mean next-token
cross-entropy of one sample (SqueezeLLM's estimate; the seed paper's code uses this raw sum).

The backward pass runs one block at a time: a forward pass stores each block's input, then the blocks are
re-run in reverse with gradients, so only one block (plus the embeddings and head) needs to sit on the
compute device. Samples go through in batches; each linear's per-sample gradient dY_b^T X_b is formed from
the captured inputs and output gradients and squared into fp32 accumulators on the compute device (on the
CPU when they do not fit). The result equals a plain full backward per sample.

Normalisations applied at calibration time (the file keeps the raw sums):
  raw       S as accumulated (the seed paper; lambda then depends on the model, the data and the layer size)
  mean      S / mean(S) per layer (weights of average saliency count 1; the penalty is a sum of squared errors)
  relative  S / (sum(S) * mean(W^2)) per layer: the penalty becomes a saliency-weighted mean of
            (Weff - W)^2 / mean(W^2), a dimensionless relative error of order 0.01-0.3 at 2-3 bits, so
            lambda has the same meaning for every layer, model and calibration set.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, hf

NORMALISATIONS = ("raw", "mean", "relative")


DEFAULT_BATCH = 8


def compute_saliency(model: nn.Module, samples: torch.Tensor, device: str | torch.device | None = None,
                     accum_device: str | torch.device = "auto", offload_blocks: bool = False,
                     progress: bool = False, batch_size: int = DEFAULT_BATCH) -> dict[str, torch.Tensor]:
    """Fisher-diagonal saliency {qualified linear name: fp32 [N, K] on the CPU} from int64 samples [n, seqlen].

    device: where blocks compute (default: where the model is). offload_blocks: keep blocks on the CPU and
    move each to `device` only while it runs (for models that do not fit). accum_device: where the fp32
    accumulators live; "auto" keeps them on `device` when they fit in half its free memory, else on the CPU
    (the progress line says so). batch_size: samples per forward / backward pass; each sample's weight
    gradient is still formed and squared on its own, so the result does not depend on it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    blocks = hf.decoder_blocks(model)
    prefix = hf.blocks_prefix(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    names = {i: hf.block_linears(b) for i, b in enumerate(blocks)}
    shapes = {f"{prefix}.{i}.{n}": lin.weight.shape for i, lins in names.items() for n, lin in lins.items()}
    accum_device, where = _accumulator_device(accum_device, device, shapes)
    sal = {key: torch.zeros(shape, dtype=torch.float32, device=accum_device) for key, shape in shapes.items()}
    norm, head = hf.final_norm(model), model.get_output_embeddings()

    samples = distributed.shard(samples)  # under torchrun: this process's share, summed below
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=samples.shape[0], desc=f"saliency{where}", unit="sample")
    for j in range(0, samples.shape[0], batch_size):
        ids = samples[j : j + batch_size]
        x0, kwargs = hf.capture_block_inputs(model, ids)
        kwargs = hf.kwargs_to(kwargs, device)
        xs = [x0.to(device)]
        with torch.no_grad():
            for b in blocks:
                with _on(b, device, offload_blocks):
                    xs.append(hf.run_block(b, xs[-1], kwargs))
        h = xs[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(norm(h)).float()
            targets = ids[:, 1:].to(device)
            # the sum of the per-sample mean losses: each sample's gradient is that of its own loss
            per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        reduction="none")
            loss = per_token.view(targets.shape).mean(1).sum()
            (g,) = torch.autograd.grad(loss, h)
        del logits, per_token
        for i in reversed(range(len(blocks))):
            g = _block_backward(blocks[i], xs[i], g, kwargs, device, offload_blocks,
                                [(sal[f"{prefix}.{i}.{n}"], lin) for n, lin in names[i].items()])
        if bar is not None:
            bar.update(ids.shape[0])
    if bar is not None:
        bar.close()
    distributed.sum_(sal.values(), device if device.type == "cuda" else None)
    # returned in CPU memory, as before: calibration moves one block's saliency to the GPU at a time
    return {key: acc.cpu() for key, acc in sal.items()}


def _accumulator_device(accum_device, device: torch.device, shapes) -> tuple[torch.device, str]:
    """Where the accumulators go, and a note for the progress line when they leave the compute device."""
    if accum_device != "auto":
        return torch.device(accum_device), ""
    if device.type != "cuda":
        return device, ""
    need = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    free, _ = torch.cuda.mem_get_info(device)
    if need <= free // 2:
        return device, ""
    return torch.device("cpu"), f" (fp32 accumulators on the CPU: {need / 2**30:.1f} GiB do not fit the GPU)"


def _block_backward(block, x, grad_out, kwargs, device, offload, targets) -> torch.Tensor:
    """Re-run `block` on x [B, L, H] with gradients, add each sample's squared weight gradients into the
    accumulators in place, and return the gradient with respect to the block's input.

    A linear's weight gradient for sample b is dY_b^T X_b: the inputs and output gradients of every linear
    are captured for the whole batch, and the per-sample products are formed one at a time (memory of one
    weight, not B)."""
    seen: dict[int, tuple] = {}

    def capture(module, args, output):
        seen[id(module)] = (args[0], output)

    with _on(block, device, offload), torch.enable_grad():
        handles = [lin.register_forward_hook(capture) for _, lin in targets]
        try:
            xin = x.detach().requires_grad_(True)
            y = hf.run_block(block, xin, kwargs)
        finally:
            for hnd in handles:
                hnd.remove()
        inputs = [seen[id(lin)][0] for _, lin in targets]
        outputs = [seen[id(lin)][1] for _, lin in targets]
        grads = torch.autograd.grad(y, [xin, *outputs], grad_outputs=grad_out)
        for (acc, _), xl, gy in zip(targets, inputs, grads[1:]):
            xl = xl.detach().reshape(xl.shape[0], -1, xl.shape[-1])
            gy = gy.reshape(gy.shape[0], -1, gy.shape[-1])
            for b in range(xl.shape[0]):
                gw = (gy[b].float().t() @ xl[b].float()).to(acc.device)
                acc.addcmul_(gw, gw)
    return grads[0]


class _on:
    """Context manager: move a block to `device` for its computation, back to the CPU afterwards if offloading."""

    def __init__(self, block, device, offload):
        self.block, self.device, self.offload = block, device, offload

    def __enter__(self):
        if self.offload:
            self.block.to(self.device)

    def __exit__(self, *exc):
        if self.offload:
            self.block.to("cpu")


def normalise(S: torch.Tensor, W: torch.Tensor, mode: str) -> torch.Tensor:
    """The saliency used in the penalty, per layer (see the module docstring)."""
    if mode not in NORMALISATIONS:
        raise ValueError(f"saliency normalisation {mode!r} is not supported; allowed: {NORMALISATIONS}")
    S = S.float()
    if mode == "raw":
        return S
    if mode == "mean":
        return S / S.mean().clamp_min(1e-30)
    return S / (S.sum().clamp_min(1e-30) * W.float().pow(2).mean().clamp_min(1e-30))


# ---------------------------------------------------------------- files
def save_saliency(sal: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict | None = None):
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"saliq_saliency": "fisher_diagonal_sum", **{k: str(v) for k, v in (meta or {}).items()}}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in sal.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_saliency(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Saliency from a file written by save_saliency; with `model`, checks that it covers every block linear
    with the right shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"saliency file {str(path)!r} does not exist; compute it with `saliq saliency`")
    try:
        sal = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"saliency file {str(path)!r} is not a readable safetensors file: {e}") from e
    for key, t in sal.items():  # a Fisher diagonal is a sum of squares: finite and >= 0
        if not t.is_floating_point():
            raise ValueError(f"saliency {key} in {str(path)!r} has dtype {t.dtype}; a saliency is floating point: "
                             "recompute it with `saliq saliency`")
        bad = int((~torch.isfinite(t) | (t < 0)).sum())
        if bad:
            raise ValueError(f"saliency {key} in {str(path)!r} has {bad} negative or non-finite values; a saliency "
                             "(Fisher diagonal, a sum of squares) must be finite and >= 0: recompute it with "
                             "`saliq saliency`")
    if model is not None:
        prefix = hf.blocks_prefix(model)
        for i, b in enumerate(hf.decoder_blocks(model)):
            for n, lin in hf.block_linears(b).items():
                key = f"{prefix}.{i}.{n}"
                if key not in sal:
                    raise ValueError(f"saliency file {str(path)!r} has no entry for {key}: it was computed "
                                     "for another model; recompute it with `saliq saliency`")
                if tuple(sal[key].shape) != tuple(lin.weight.shape):
                    raise ValueError(f"saliency {key} in {str(path)!r} has shape {tuple(sal[key].shape)}, the "
                                     f"model's weight is {tuple(lin.weight.shape)}: it belongs to another model")
    return sal


def saliency_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of a saliency file written by save_saliency; None when `path` is not one (missing file,
    another safetensors file, not safetensors at all)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return meta if "saliq_saliency" in meta else None
