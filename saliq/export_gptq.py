"""Export a saliq checkpoint as a GPTQ checkpoint (AutoGPTQ / GPTQModel format, v1 by default, v2 on request),
which vLLM serves with `--quantization gptq`, plus the calibrated LoRA as a PEFT adapter for `--enable-lora`
(docs/FORMAT.md, "GPTQ export").

The GPTQ tensors of a linear W [N, K], b bits, G groups of g inputs:
    qweight  int32 [K * b / 32, N]   levels packed along K: level (k, n) at bit b * k of column n's bit string
    qzeros   int32 [G, N * b / 32]   zero points (v1: minus one), packed along N the same way
    scales   float16 [G, N]
    g_idx    int32 [K]               k // g (no activation reordering)
The bit string of a column is its words concatenated least significant bit first; at 2 and 4 bits a level never
crosses a word, so saliq's qweight already is GPTQ's; 3-bit levels do cross words and are repacked.

Zero points: v1 kernels add 1 to every stored zero point, so a group's zero point must lie in [1, 2^b] (v2: in
[0, 2^b - 1]). A group whose
zero point lies outside is moved exactly when its levels leave room (q + d, z + d for one integer d); otherwise it
is refused, or re-fitted on request (a new scale and zero point for the same dequantized weights, which changes them:
the export reports how much).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .packing import unpack

# stored zero point = z - ZERO_OFFSET. v1 ("gptq") is read by every GPTQ kernel, old and new; v2 only by loaders that
# know it (an older vLLM reads a v2 checkpoint as v1: every weight off by one step, silently)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


class GPTQExportError(ValueError):
    """The checkpoint cannot be written in GPTQ format exactly; the message says what and what to do."""


# ---------------------------------------------------------------- bit packing
def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Integers [R, L] (each < 2**bits) -> int32 words [R, L * bits / 32]: value j of a row at bit offset bits * j
    of the row's bit string (words least significant first). L * bits must be a multiple of 32."""
    rows, length = values.shape
    if (length * bits) % 32:
        raise ValueError(f"{length} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    pos = torch.arange(length, device=values.device, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    out = torch.zeros(rows, length * bits // 32 + 1, dtype=torch.int64, device=values.device)
    out.scatter_add_(1, word.expand(rows, -1), (v << shift) & 0xFFFFFFFF)
    # a level that crosses a word boundary (3-bit) puts its high bits in the next word
    spill = shift + bits > 32
    if spill.any():
        out.scatter_add_(1, (word + 1)[spill].expand(rows, -1), v[:, spill] >> (32 - shift[spill]))
    out = out[:, :-1]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


# ---------------------------------------------------------------- zero points
@dataclass
class LayerReport:
    name: str
    groups: int
    moved: int = 0             # groups moved exactly (q + d, z + d)
    refitted: int = 0          # groups re-fitted (weights changed)
    refit_rel_error: float = 0.0   # ||W_gptq - W_saliq|| / ||W_saliq|| over the layer


@dataclass
class ExportReport:
    layers: list = field(default_factory=list)
    subnormal_scales: int = 0      # scales below float16's normal range (relative precision worse than 2^-11)

    def to_dict(self) -> dict:
        return {"layers": len(self.layers), "groups": sum(r.groups for r in self.layers),
                "groups_moved": sum(r.moved for r in self.layers),
                "groups_refitted": sum(r.refitted for r in self.layers),
                "max_refit_rel_error": max((r.refit_rel_error for r in self.layers), default=0.0),
                "refitted_layers": {r.name: r.refitted for r in self.layers if r.refitted},
                "subnormal_scales": self.subnormal_scales}


def fit_zero_points(q: Tensor, z: Tensor, s: Tensor, bits: int, group_len: int, refit: bool, name: str,
                    offset: int = 1):
    """Levels q [N, K], zero points z [N, G] and scales s [N, G] (fp32) rewritten so that every zero point lies in
    the stored range shifted by `offset`: [1, 2^bits] for v1, [0, 2^bits - 1] for v2. Returns (q, z, s, report)."""
    qmax = (1 << bits) - 1
    lo, hi = offset, qmax + offset
    n, k = q.shape
    g = k // group_len
    qg = q.to(torch.int64).view(n, g, group_len)
    z = z.to(torch.int64).clone()
    rep = LayerReport(name, groups=n * g)
    bad = (z < lo) | (z > hi)
    if not bad.any():
        return q, z, s, rep
    # exact: shift levels and zero point together by d, if some d keeps both in range
    qmin, qmx = qg.amin(-1), qg.amax(-1)
    d_lo = torch.maximum(lo - z, -qmin)
    d_hi = torch.minimum(hi - z, qmax - qmx)
    d = torch.where(d_lo > 0, d_lo, torch.where(d_hi < 0, d_hi, torch.zeros_like(d_lo)))
    movable = bad & (d_lo <= d_hi)
    rep.moved = int(movable.sum())
    if movable.any():
        dd = torch.where(movable, d, torch.zeros_like(d))
        qg = qg + dd.unsqueeze(-1)
        z = z + dd
    left = bad & ~movable
    if left.any():
        if not refit:
            rows, cols = left.nonzero(as_tuple=True)
            raise GPTQExportError(
                f"{name}: {int(left.sum())} of {n * g} groups have zero points GPTQ cannot hold (e.g. row "
                f"{int(rows[0])}, group {int(cols[0])}: z = {int(z[rows[0], cols[0]])}; allowed {lo}..{hi} at "
                f"{bits} bits, levels {int(qmin[rows[0], cols[0]])}..{int(qmx[rows[0], cols[0]])} leave no room to "
                "move it). Pass --refit-zeros to re-fit those groups (it changes their weights; the export reports "
                "by how much)")
        qg, z, s, rep = _refit(qg, z, s, left, bits, rep, lo, hi)
    return qg.reshape(n, k).to(torch.uint8), z, s, rep


def _refit(qg, z, s, left, bits, rep, lo, hi):
    """Re-quantize the groups in `left` from their dequantized weights: for every allowed zero point the scale
    that keeps the group's extremes in range, the one with the smallest squared error wins."""
    qmax = (1 << bits) - 1
    w = ((qg - z.unsqueeze(-1)).to(torch.float32) * s.unsqueeze(-1))[left]         # [B, g]
    wmax, wmin = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    best_err = torch.full(wmax.shape, float("inf"))
    best_q = best_z = best_s = None
    for zc in range(lo, hi + 1):
        cand = []
        if qmax > zc:
            cand.append(torch.where(wmax > 0, wmax / (qmax - zc), torch.zeros_like(wmax)))
        if zc > 0:
            cand.append(torch.where(wmin < 0, wmin / -zc, torch.zeros_like(wmin)))
        sc = torch.stack(cand).amax(0).clamp_min(1e-8)
        qc = torch.clamp(torch.round(w / sc) + zc, 0, qmax)
        err = ((qc - zc) * sc - w).pow(2).sum(-1, keepdim=True)
        take = err < best_err
        if best_q is None:
            best_q, best_z, best_s = qc, torch.full_like(sc, zc), sc
        else:
            best_q = torch.where(take, qc, best_q)
            best_z = torch.where(take, torch.full_like(sc, zc), best_z)
            best_s = torch.where(take, sc, best_s)
        best_err = torch.minimum(err, best_err)
    ref = ((qg - z.unsqueeze(-1)).to(torch.float32) * s.unsqueeze(-1))
    qg, z, s = qg.clone(), z.clone(), s.clone()
    qg[left] = best_q.to(torch.int64)
    z[left] = best_z.squeeze(-1).to(torch.int64)
    s[left] = best_s.squeeze(-1)
    new = (qg - z.unsqueeze(-1)).to(torch.float32) * s.half().float().unsqueeze(-1)
    rep.refitted = int(left.sum())
    rep.refit_rel_error = float((new - ref).norm() / ref.norm().clamp_min(1e-30))
    return qg, z, s, rep


# ---------------------------------------------------------------- one layer
def gptq_tensors(m, name: str, refit: bool = False, checkpoint_format: str = "gptq") -> tuple[dict, LayerReport]:
    """GPTQ tensors (qweight, qzeros, scales, g_idx, bias) of one QuantLinear."""
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; allowed: {sorted(ZERO_OFFSET)}")
    offset = ZERO_OFFSET[checkpoint_format]
    bits, n, k = m.spec.bits, m.out_features, m.in_features
    per = 32 if bits == 3 else 32 // bits
    if k % per or n % per:
        raise GPTQExportError(f"{name}: in_features={k} and out_features={n} must be multiples of {per} for "
                              f"{bits}-bit GPTQ (whole 32-bit words along both dimensions)")
    group_len = m.spec.group_len(k)
    packed = m.packed                                                              # format v1
    q = unpack(packed.qweight, packed.qweight_hi, bits, k)                         # [N, K]
    z = m.zeros.t().to(torch.int64)                                                # [N, G]
    s = m.scales.t().to(torch.float32)
    q, z, s, rep = fit_zero_points(q, z, s, bits, group_len, refit, name, offset)
    qmax = (1 << bits) - 1
    # what pack_bits is given must fit its width: a wider value would spill into its neighbours' bits
    if int(q.max()) > qmax or int((z - offset).min()) < 0 or int((z - offset).max()) > qmax:
        raise GPTQExportError(f"{name}: levels or zero points left the {bits}-bit range after fitting; not written")
    out = {
        "qweight": pack_bits(q, bits).t().contiguous(),
        "qzeros": pack_bits((z - offset).t().contiguous(), bits),
        "scales": s.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32) // group_len),
    }
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return out, rep


# ---------------------------------------------------------------- the checkpoint
def export_gptq(ckpt: str | os.PathLike, out: str | os.PathLike, refit: bool = False, adapter: bool = True,
                max_shard_bytes: int = 2 * 1024**3, checkpoint_format: str = "gptq") -> dict:
    """Write checkpoint `ckpt` to `out` in GPTQ format (float16), with its calibrated LoRA as a PEFT adapter in
    `out/lora` (adapter=True and the checkpoint has LoRA). Nothing is written when a layer cannot be exported."""
    from .checkpoint import split_shards, write_atomically, write_json
    from .nn import QuantLinear
    from .serialize import load, unique_state_dict

    model, tok = load(ckpt)
    qc = model.config.quantization_config
    _check_every_block_linear_is_quantized(model)
    for name, m in model.named_modules():  # GPTQ holds one width and no sparse part
        if isinstance(m, QuantLinear) and (m.reserved or m.spec.bits != qc.bits):
            what = f"{m.reserved} reserved weights" if m.reserved else f"{m.spec.bits} bits (the model: {qc.bits})"
            raise GPTQExportError(f"{name} has {what}; GPTQ stores every layer at one width without reserved "
                                  "weights: export a checkpoint quantized without --reserve-fraction / --bit-budget")
    report, tensors = ExportReport(), {}
    qnames = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            t, rep = gptq_tensors(m, name, refit, checkpoint_format)
            report.layers.append(rep)
            report.subnormal_scales += int(((m.scales.abs() < 2.0**-14) & (m.scales != 0)).sum())
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
    for key, v in unique_state_dict(model).items():
        if key.rpartition(".")[0] not in qnames:
            tensors[key] = v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
    lora = None
    if adapter and any(m.lora_A is not None for m in model.modules() if isinstance(m, QuantLinear)):
        from .adapters import adapter_from_model

        lora = adapter_from_model(model)

    gptq = {"quant_method": "gptq", "bits": qc.bits, "group_size": qc.group_size, "desc_act": False,
            "sym": False, "checkpoint_format": checkpoint_format, "true_sequential": True, "static_groups": False,
            "damp_percent": 0.01, "lm_head": False,
            "saliq": {"source_method": qc.method, "format_version": qc.format_version, "refit_zeros": refit}}
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "transformers_weights")}
    cfg.update(quantization_config=gptq, dtype="float16", architectures=[type(model).__name__])
    out = Path(out)

    def write(tmp: Path):
        from safetensors.torch import save_file

        shards = split_shards(tensors, max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(names, shards):
            save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum((tmp / f).stat().st_size for f in names)
        write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                          "weight_map": weight_map})
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "quantize_config.json", {k: v for k, v in gptq.items() if k != "quant_method"})
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            (tmp / "generation_config.json").write_text(gen.to_json_string(use_diff=True))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        if lora is not None:
            from .adapters import write_adapter

            write_adapter(tmp / "lora", lora[0], lora[1], str(out.resolve()))

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GPTQExportError(f"out {str(out)!r} exists and is not an empty directory; choose a new directory")
    write_atomically(out, write)  # into a temporary sibling, put in place when complete (with a file manifest)
    result = report.to_dict()
    result.update(out=str(out), bits=qc.bits, group_size=qc.group_size, checkpoint_format=checkpoint_format,
                  adapter=str(out / "lora") if lora is not None else None,
                  lora_rank=lora[0]["r"] if lora is not None else 0)
    return result


def _check_every_block_linear_is_quantized(model):
    """GPTQ loaders expect packed tensors for every linear of every decoder block."""
    from torch import nn

    from . import hf

    for i, block in enumerate(hf.decoder_blocks(model)):
        dense = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        if dense:
            raise GPTQExportError(f"decoder block {i} has linears that are not quantized ({dense[:3]}); GPTQ "
                                  "checkpoints quantize every linear of every block")


def vllm_command(out: str | os.PathLike, lora_rank: int = 0) -> str:
    """The command that serves an export (with its adapter as model `saliq-lora`)."""
    cmd = f"vllm serve {out} --quantization gptq --dtype float16"
    if lora_rank:
        cmd += (f" --enable-lora --max-lora-rank {max(8, 1 << (lora_rank - 1).bit_length())} "
                f"--lora-modules saliq-lora={Path(out) / 'lora'}")
    return cmd

