"""transformers models: load one (directory, GGUF file, saliq checkpoint or model id), find its decoder blocks and
their linears, and run the blocks one at a time for calibration.

A model with QuantLinear layers becomes a checkpoint and back in serialize.py (`save`, `load`, re-exported here);
the checkpoint files (layout, manifest, verification, the atomic writer) live in checkpoint.py; docs/FORMAT.md
("Checkpoint files") describes them.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import checkpoint as ckpt
from .checkpoint import (  # noqa: F401  (re-exported: callers import them from hf)
    CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, QUANT_METHOD, CheckpointError, checkpoint_size,
    is_saliq_checkpoint, read_quant_config, verify,
)
from .serialize import DEFAULT_SHARD_BYTES, load, quant_config_of, save, without_lora  # noqa: F401  (re-exported)


# ---------------------------------------------------------------- loading models
def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a transformers directory, a `.gguf` file, or a saliq checkpoint directory; a model
    id `org/name` is fetched into the Hugging Face cache first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import resolve

    p = resolve(path)
    if p.is_dir() and ckpt.looks_like_saliq_checkpoint(p):
        return load(p, device=device)
    converted = None
    if p.is_file() and p.suffix == ".gguf":
        converted = _gguf_conversion_dir(p, dtype)
        if (converted / "config.json").is_file():  # converted by an earlier load: plain safetensors
            kw, src, converted = {}, str(converted), None
        else:
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
    if converted is not None:
        _save_conversion(model, tokenizer, converted)
    return model.to(device), tokenizer


def _gguf_conversion_dir(gguf: os.PathLike, dtype: torch.dtype):
    """Where a GGUF file's model, dequantized to `dtype`, is kept as a transformers folder: reading a GGUF file
    (its metadata parsed in Python, every tensor dequantized) took ~20 s for the demo's 135M-parameter model,
    reading the converted folder well under a second. Keyed by the file's absolute path, size and modification
    time (hashing the file itself would read gigabytes at every load of a large model), so an edited or
    replaced file converts again."""
    import hashlib
    from pathlib import Path

    from .testbed import cache_dir

    st = os.stat(gguf)
    ident = f"{os.path.abspath(gguf)}|{st.st_size}|{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(ident).hexdigest()[:16]
    return Path(cache_dir()) / "gguf-converted" / f"{Path(gguf).stem}-{digest}-{str(dtype)[6:]}"


def _save_conversion(model, tokenizer, dest) -> None:
    """Write the converted model and tokenizer to `dest` atomically (a folder renamed into place); the cache is an
    optimisation, so a failure to write it is not an error."""
    import shutil

    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, dest)
    except Exception:  # no space, a read-only cache, another process renamed its copy first, a model that
        pass  # transformers cannot save: the load itself has succeeded, the next one converts again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
