"""A model with QuantLinear layers as a saliq checkpoint and back: `save` writes the tensors, config and manifest
(atomically, checkpoint.py), `load` verifies the files and rebuilds the model through transformers'
from_pretrained and saliq's quantizer (hf_quantizer.py). docs/FORMAT.md, "Checkpoint files"."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import storage
from .checkpoint import (CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, QUANT_METHOD, CheckpointError,
                         verify)

DEFAULT_SHARD_BYTES = 2 * 1024**3


# ---------------------------------------------------------------- save
def _quantized_modules(model: nn.Module) -> dict:
    from .nn import QuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


# quantization_config entries that save() derives from the model; the others (calibration settings, run ...) are
# informational and carried over from a loaded checkpoint
_DERIVED = ("quant_method", "format_version", "manifest", "bits", "group_size", "symmetric", "lora_rank",
            "lora_alpha", "modules")


def quant_config_of(model: nn.Module, method: str | None = None, extra: dict | None = None,
                    stored: dict | None = None) -> dict:
    """The `quantization_config` describing `model`'s QuantLinear layers (docs/FORMAT.md); informational entries
    of the config it was loaded with are kept, `method` and `extra` override them. stored: the tensors as the
    checkpoint stores them (storage.stored_state), for the per-module storage dtypes."""
    qmods = _quantized_modules(model)
    if not qmods:
        raise ValueError("save() expects a model whose linears were replaced by saliq QuantLinear layers")
    shared = {(m.spec.group_size, m.spec.symmetric) for m in qmods.values()}
    if len(shared) != 1:
        raise ValueError(f"all quantized layers must share one group size and symmetry to be saved; found {shared}")
    # the base width: the narrowest; layers given more bits (bit allocation) say so in their module entry
    spec = min((m.spec for m in qmods.values()), key=lambda sp: sp.bits)
    stored = stored if stored is not None else storage.stored_state(unique_state_dict(model))
    prev = getattr(model.config, "quantization_config", None)
    prev = prev.to_dict() if hasattr(prev, "to_dict") else dict(prev) if isinstance(prev, dict) else {}
    info = {k: v for k, v in prev.items() if k not in _DERIVED} if prev.get("quant_method") == QUANT_METHOD else {}
    ranks = {name: _lora_rank(m) for name, m in qmods.items()}
    alphas = {name: _lora_alpha(m) for name, m in qmods.items()}
    return {
        "quant_method": QUANT_METHOD,
        "format_version": ckpt.CHECKPOINT_FORMAT,
        "manifest": MANIFEST_NAME,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "method": method or info.pop("method", None) or "unknown",
        "lora_rank": max(ranks.values()),
        "lora_alpha": max(alphas.values()),
        "modules": {name: _module_entry(name, m, ranks[name], alphas[name], stored) for name, m in qmods.items()},
        **{k: v for k, v in info.items() if k != "method"},
        **(extra or {}),
    }


def _module_entry(name: str, m, rank: int, alpha: float, stored: dict) -> dict:
    """A QuantLinear's entry in `modules`: what the loader needs to build it before reading its tensors."""
    zeros = stored.get(f"{name}.zeros", m.zeros)
    entry = {"lora_rank": rank, "lora_alpha": alpha, "bias": m.bias is not None, "bits": m.spec.bits,
             "zeros_dtype": storage.zeros_storage_name(zeros)}
    if m.reserved:
        entry.update(reserved=m.reserved, reserved_dtype=str(m.sparse_values.dtype).removeprefix("torch."))
    return entry


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, method: str | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict | None = None,
         files: dict | None = None, float_bits: int = 16) -> dict:
    """Write `model` (with QuantLinear layers) as a checkpoint in `out_dir`, atomically: everything is written to
    a sibling `<out_dir>.tmp-<random>`, covered by a manifest, fsynced, then put in place of `out_dir` (see
    checkpoint.write_atomically: an existing saliq checkpoint there is replaced, other entries such as `.calib/`
    are kept, a directory holding another kind of model is refused). A failure leaves `out_dir` as it was.

    method: the quantization method recorded (default: the one the model was loaded with, else "unknown").
    extra: more entries for `quantization_config` (e.g. the calibration settings), informational only.
    files: {name in the checkpoint: source path} of more files to copy in, covered by the manifest.
    float_bits: 16 stores the float tensors (embeddings, norms, LoRA) in 16 bits and rounds the model in memory to
    the stored values; 32 keeps them as they are (saliq/storage.py).
    Afterwards the model carries this quantization_config, so `model.save_pretrained` writes the same format.
    Returns {"bytes": size of the checkpoint's files, "quantized_weights": ..., "files": [names]}."""
    from .hf_quantizer import WEIGHTS_GUARD, attach

    tensors = storage.stored_state(unique_state_dict(model), float_bits)
    qc = quant_config_of(model, method, extra, stored=tensors)
    qmods = _quantized_modules(model)
    reserved = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, ckpt.SINGLE_NAME}
    for name, src in (files or {}).items():
        if name in reserved or ckpt.SHARD_RE.fullmatch(name):
            raise ValueError(f"files: {name!r} is a name the checkpoint itself uses")
        ckpt.check_name(Path(out_dir), name, "files entry")  # a plain relative name
        if not Path(src).is_file():
            raise FileNotFoundError(f"files: {name!r}: {src} is not a file")

    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(next(iter(qmods.values())).scales.dtype).removeprefix("torch.")
    # transformers without saliq would skip the unknown quant_method and build random linears: it fails on this
    # absent index instead (saliq's quantizer replaces it by the real one)
    cfg["transformers_weights"] = WEIGHTS_GUARD

    def write(tmp: Path):
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            (tmp / GENERATION_CONFIG_NAME).write_text(gen.to_json_string(use_diff=True))
        ckpt.write_shards(tmp, tensors, max_shard_bytes,
                          metadata={"format": "pt", "saliq_format_version": str(ckpt.CHECKPOINT_FORMAT)})
        ckpt.write_json(tmp / CONFIG_NAME, cfg)
        for name, src in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)

    manifest = ckpt.write_atomically(out_dir, write)
    storage.round_model_to(model, tensors)  # the model in memory is now the model on disk
    attach(model, qc)
    out = Path(out_dir)
    total = sum(e["bytes"] for e in manifest["files"].values()) + (out / MANIFEST_NAME).stat().st_size
    return {"bytes": total, "quantized_weights": sum(m.in_features * m.out_features for m in qmods.values()),
            "bits_per_weight": storage.bits_report(qmods, tensors)["bits_per_weight"],
            "files": sorted(manifest["files"]) + [MANIFEST_NAME]}


def _lora_alpha(m) -> float:
    """alpha of a LoRA adapter (scale = alpha / r); 0 without one."""
    r = _lora_rank(m)
    if not r:
        return 0.0
    alpha = getattr(m, "lora_alpha", None)
    return float(alpha) if alpha is not None else float(m.lora_scale) * r


def _lora_rank(m) -> int:
    a = getattr(m, "lora_A", None)
    return 0 if a is None else int(a.shape[0])


def unique_state_dict(model: nn.Module) -> dict:
    """state_dict without tied duplicates (safetensors refuses shared storage); tie_weights() restores them."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


# ---------------------------------------------------------------- load
def load(ckpt_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
         revision: str | None = None, lora: bool = True):
    """(model, tokenizer) rebuilt from a saliq checkpoint, with QuantLinear layers; tokenizer None if absent.

    ckpt_dir: a directory, or a model id `org/name` (at `revision`) fetched into the Hugging Face cache (offline:
    found there). Every file is verified against the checkpoint's manifest first (checkpoint.verify, as
    `saliq info` does); a damaged or inconsistent checkpoint raises CheckpointError, never loads as a different
    model. The model is built by transformers' from_pretrained through saliq's quantizer: QuantLinear layers are
    created on the meta device and receive the packed tensors, no float linear is materialised.
    lora=False: drop the calibrated LoRA of every layer (the base for a PEFT adapter exported with
    `saliq export-adapter`)."""
    from transformers import AutoModelForCausalLM

    from .hf_quantizer import register, verified
    from .hub import resolve

    d = resolve(ckpt_dir, revision)
    ck = verify(d)
    dtype = _checkpoint_dtype(ck, dtype)
    register()
    device_map = None if torch.device(device).type == "cpu" else {"": device}
    try:
        with verified(ck):
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, device_map=device_map)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{d / CONFIG_NAME}: the model it describes cannot be built "
                              f"({ckpt.one_line(e)})") from None
    if not lora:
        without_lora(model)
    model.eval().requires_grad_(False)
    tokenizer = ck.load_tokenizer()
    return model.to(device), tokenizer


def _checkpoint_dtype(ck, dtype):
    """The float dtype to load in: the caller's, else the checkpoint's config.dtype, else float32."""
    dtype = dtype or ck.config.get("dtype") or ck.config.get("torch_dtype") or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{ck.dir / CONFIG_NAME}: dtype {dtype!r} is not a float dtype")
    return dtype


def without_lora(model: nn.Module) -> nn.Module:
    """Drop the LoRA factors of every QuantLinear in place (the packed weights alone remain)."""
    from .hf_quantizer import attach

    for m in _quantized_modules(model).values():
        m.lora_A = m.lora_B = None
        m.lora_rank, m.lora_scale = 0, 0.0
    if getattr(model.config, "quantization_config", None) is not None:
        attach(model, quant_config_of(model))
    return model
