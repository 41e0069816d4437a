"""transformers integration: load a model (directory, GGUF file or saliq checkpoint), find its decoder blocks
and their linears, and save / load quantized checkpoints (safetensors only, no pickle).

Checkpoint files (layout, manifest, verification, the atomic writer) live in checkpoint.py; docs/FORMAT.md
("Checkpoint files") describes them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .checkpoint import (  # noqa: F401  (re-exported: callers import them from hf)
    CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, QUANT_METHOD, CheckpointError, checkpoint_size,
    is_saliq_checkpoint, read_quant_config, verify,
)
from .spec import QuantSpec

DEFAULT_SHARD_BYTES = 2 * 1024**3


# ---------------------------------------------------------------- loading models
def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a transformers directory, a `.gguf` file, or a saliq checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_dir() and ckpt.looks_like_saliq_checkpoint(p):
        return load(p, device=device)
    if p.is_file() and p.suffix == ".gguf":
        kw = dict(gguf_file=p.name)
        src = str(p.parent)
    elif p.is_dir() and (p / "config.json").is_file():
        kw, src = {}, str(p)
    else:
        raise FileNotFoundError(
            f"model {str(path)!r} is neither a .gguf file nor a directory with config.json "
            "(a transformers model or a saliq checkpoint)"
        )
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    # A GGUF model is dequantized to `dtype`; drop the GGUF marker so it is treated as a plain float model.
    if getattr(model.config, "quantization_config", None) is not None and kw:
        del model.config.quantization_config
        model.hf_quantizer = None
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (LLaMA / Mistral / Qwen style `model.model.layers`, GPT-2 style `h`)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}; supported: LLaMA-style models")


def blocks_prefix(model: nn.Module) -> str:
    """Qualified name of the block list, e.g. `model.layers`."""
    blocks = decoder_blocks(model)
    return next(name for name, mod in model.named_modules() if mod is blocks)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder block, by name relative to the block (e.g. `self_attn.q_proj`)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---------------------------------------------------------------- save
def _quantized_modules(model: nn.Module) -> dict:
    from .nn import QuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, method: str = "unknown",
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict | None = None,
         files: dict | None = None) -> dict:
    """Write `model` (with QuantLinear layers) as a checkpoint in `out_dir`, atomically: everything is written to
    a sibling `<out_dir>.tmp-<random>`, covered by a manifest, fsynced, then put in place of `out_dir` (see
    checkpoint.write_atomically: an existing saliq checkpoint there is replaced, other entries such as `.calib/`
    are kept, a directory holding another kind of model is refused). A failure leaves `out_dir` as it was.

    extra: more entries for `quantization_config` (e.g. the calibration settings), informational only.
    files: {name in the checkpoint: source path} of more files to copy in, covered by the manifest.
    Returns {"bytes": size of the checkpoint's files, "quantized_weights": ..., "files": [names]}."""
    from .packing import FORMAT_VERSION

    qmods = _quantized_modules(model)
    if not qmods:
        raise ValueError("save() expects a model whose linears were replaced by saliq QuantLinear layers")
    specs = {m.spec for m in qmods.values()}
    if len(specs) != 1:
        raise ValueError(f"all quantized layers must share one QuantSpec to be saved; found {specs}")
    spec = specs.pop()
    ranks = {name: _lora_rank(m) for name, m in qmods.items()}
    alphas = {name: _lora_alpha(m) for name, m in qmods.items()}
    reserved = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME}
    for name, src in (files or {}).items():
        if name in reserved or ckpt.SHARD_RE.fullmatch(name):
            raise ValueError(f"files: {name!r} is a name the checkpoint itself uses")
        ckpt.check_name(Path(out_dir), name, "files entry")  # a plain relative name
        if not Path(src).is_file():
            raise FileNotFoundError(f"files: {name!r}: {src} is not a file")

    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "manifest": MANIFEST_NAME,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "method": method,
        "lora_rank": max(ranks.values()),
        "lora_alpha": max(alphas.values()),
        "modules": {name: {"lora_rank": ranks[name], "lora_alpha": alphas[name], "bias": m.bias is not None}
                    for name, m in qmods.items()},
        **(extra or {}),
    }
    tensors = _unique_state_dict(model)

    def write(tmp: Path):
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            (tmp / GENERATION_CONFIG_NAME).write_text(gen.to_json_string(use_diff=True))
        ckpt.write_shards(tmp, tensors, max_shard_bytes,
                          metadata={"format": "pt", "saliq_format_version": str(FORMAT_VERSION)})
        ckpt.write_json(tmp / CONFIG_NAME, cfg)
        for name, src in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)

    manifest = ckpt.write_atomically(out_dir, write)
    out = Path(out_dir)
    total = sum(e["bytes"] for e in manifest["files"].values()) + (out / MANIFEST_NAME).stat().st_size
    return {"bytes": total, "quantized_weights": sum(m.in_features * m.out_features for m in qmods.values()),
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


def _unique_state_dict(model: nn.Module) -> dict:
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
def load(ckpt_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) rebuilt from a saliq checkpoint, with QuantLinear layers; tokenizer None if absent.

    Every file is verified against the checkpoint's manifest first (checkpoint.verify, as `saliq info` does);
    a damaged or inconsistent checkpoint raises CheckpointError, never loads as a different model."""
    ck = verify(ckpt_dir)
    d = ck.dir
    try:
        model = _build_model(ck, dtype)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{d / CONFIG_NAME}: the model it describes cannot be built "
                              f"({ckpt.one_line(e)})") from None
    state = ck.load_tensors()

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    tied = set(_tied_keys(model))
    if unexpected or any(k not in tied for k in missing):
        raise CheckpointError(
            f"{d}: tensors do not match the config: missing {[k for k in missing if k not in tied][:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{d}: tensor {k} has shape {tuple(v.shape)}, the config implies "
                                  f"{tuple(expected[k].shape)}")
        if v.dtype != expected[k].dtype and not (v.is_floating_point() and expected[k].is_floating_point()):
            raise CheckpointError(f"{d}: tensor {k} has dtype {v.dtype}, the config implies {expected[k].dtype}")
    model.load_state_dict(state, strict=False)
    if missing:
        model.tie_weights()
    model.eval().requires_grad_(False)
    tokenizer = ck.load_tokenizer()
    return model.to(device), tokenizer


def _build_model(ck, dtype):
    """The model the verified config describes, its quantized linears empty QuantLinear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .nn import QuantLinear

    qc = ck.quant_config
    spec = QuantSpec(bits=qc["bits"], group_size=qc["group_size"], symmetric=qc["symmetric"])
    cfg_dict = dict(ck.config)
    cfg_dict.pop("quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{ck.dir / CONFIG_NAME}: dtype {dtype!r} is not a float dtype")

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, mq in qc["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{ck.dir / CONFIG_NAME}: lists quantized module {name!r}, which the model does "
                                  "not have") from None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{ck.dir / CONFIG_NAME}: lists quantized module {name!r}, which is not a linear "
                                  "layer")
        q = QuantLinear.empty(lin.in_features, lin.out_features, spec, bias=bool(mq["bias"]),
                              lora_rank=int(mq["lora_rank"]), lora_alpha=float(mq["lora_alpha"]), dtype=dtype)
        set_submodule(model, name, q)
    raw = ck.data(GENERATION_CONFIG_NAME)
    if raw is not None:
        model.generation_config = GenerationConfig.from_dict(json.loads(raw))
    return model


def _tied_keys(model) -> list[str]:
    """state_dict keys that share storage with an earlier key (tied embeddings)."""
    sd = model.state_dict()
    kept = _unique_state_dict(model)
    return [k for k in sd if k not in kept]


# ---------------------------------------------------------------- running blocks one at a time
class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first block's input for `input_ids` [n, L] (run one sample at a time), plus the keyword arguments
    the model passes to every block (attention mask, position embeddings) for a batch of one.

    Returns (X [n, L, hidden] on the embedding's device, block_kwargs)."""
    first = decoder_blocks(model)[0]
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    xs = []
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(input_ids=input_ids[i : i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            xs.append(seen["x"][0])
    finally:
        handle.remove()
    kwargs = dict(seen["kwargs"])
    for k in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if k in kwargs:
            kwargs[k] = None
    kwargs["use_cache"] = False
    return torch.stack(xs), kwargs


def kwargs_to(kwargs: dict, device) -> dict:
    """Block kwargs with every tensor (also inside tuples) moved to `device`."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(u) for u in v)
        return v
    return {k: move(v) for k, v in kwargs.items()}


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on hidden states x [B, L, H] (older transformers return a tuple)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def final_norm(model: nn.Module) -> nn.Module:
    for path in ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")
