"""transformers integration: load a model (directory, GGUF file or saliq checkpoint), find its decoder blocks
and their linears, and save / load quantized checkpoints (safetensors only, no pickle).

Checkpoint layout (a transformers-style directory):
    config.json                       the model config plus `quantization_config` (quant_method "saliq")
    model-0000i-of-0000n.safetensors  tensors; quantized linears hold qweight, qweight_hi, scales, zeros, lora_*
    model.safetensors.index.json      weight_map plus a sha256 per shard, checked on load
    tokenizer files
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .spec import QuantSpec

QUANT_METHOD = "saliq"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config; never load it silently."""


# ---------------------------------------------------------------- loading models
def is_saliq_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == QUANT_METHOD


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a transformers directory, a `.gguf` file, or a saliq checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_dir() and is_saliq_checkpoint(p):
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
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict | None = None) -> dict:
    """Write `model` (with QuantLinear layers) to `out_dir`; returns {"bytes": total size on disk, ...}.

    extra: more entries for `quantization_config` (e.g. the calibration settings), informational only."""
    from safetensors.torch import save_file

    from .packing import FORMAT_VERSION

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qmods = _quantized_modules(model)
    if not qmods:
        raise ValueError("save() expects a model whose linears were replaced by saliq QuantLinear layers")
    specs = {m.spec for m in qmods.values()}
    if len(specs) != 1:
        raise ValueError(f"all quantized layers must share one QuantSpec to be saved; found {specs}")
    spec = specs.pop()
    ranks = {name: _lora_rank(m) for name, m in qmods.items()}
    alphas = {name: _lora_alpha(m) for name, m in qmods.items()}

    tensors = _unique_state_dict(model)
    shards = _split_shards(tensors, max_shard_bytes)
    weight_map, checksums = {}, {}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        tmp = out / (fname + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, str(tmp),
                  metadata={"format": "pt", "saliq_format_version": str(FORMAT_VERSION)})
        os.replace(tmp, out / fname)
        checksums[fname] = _sha256(out / fname)
        weight_map.update({k: fname for k in shard})

    total = sum((out / f).stat().st_size for f in names)
    index = {"metadata": {"total_size": total, "sha256": checksums}, "weight_map": weight_map}
    _write_json(out / INDEX_NAME, index)

    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
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
    _write_json(out / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return {"bytes": total, "quantized_weights": sum(m.in_features * m.out_features for m in qmods.values())}


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


def _split_shards(tensors: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- load
def read_quant_config(ckpt_dir: str | os.PathLike) -> dict:
    """The checked `quantization_config` of a saliq checkpoint."""
    from .packing import FORMAT_VERSION

    d = Path(ckpt_dir)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{str(d)!r} has no config.json: not a saliq checkpoint")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON ({e}); the checkpoint is corrupt") from e
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{d} is not a saliq checkpoint (quantization_config.quant_method != 'saliq')")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{d} uses packed format version {qc.get('format_version')!r}; this saliq reads version "
            f"{FORMAT_VERSION}. Re-quantize the model or install the saliq version that wrote it"
        )
    QuantSpec(bits=qc["bits"], group_size=qc["group_size"], symmetric=qc["symmetric"])  # validates
    return qc


def load(ckpt_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) rebuilt from a saliq checkpoint, with QuantLinear layers; tokenizer None if absent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .nn import QuantLinear

    d = Path(ckpt_dir)
    qc = read_quant_config(d)
    spec = QuantSpec(bits=qc["bits"], group_size=qc["group_size"], symmetric=qc["symmetric"])
    cfg_dict = json.loads((d / "config.json").read_text())
    cfg_dict.pop("quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    state = _load_verified_tensors(d, load_file, SafetensorError)

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, mq in qc["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"config lists quantized module {name!r}, which the model does not have") from e
        q = QuantLinear.empty(lin.in_features, lin.out_features, spec, bias=bool(mq["bias"]),
                              lora_rank=int(mq["lora_rank"]), lora_alpha=float(mq["lora_alpha"]), dtype=dtype)
        set_submodule(model, name, q)

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
    model.load_state_dict(state, strict=False)
    if missing:
        model.tie_weights()
    model.eval().requires_grad_(False)
    tokenizer = None
    if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(d))
    return model.to(device), tokenizer


def _tied_keys(model) -> list[str]:
    """state_dict keys that share storage with an earlier key (tied embeddings)."""
    sd = model.state_dict()
    kept = _unique_state_dict(model)
    return [k for k in sd if k not in kept]


def _load_verified_tensors(d: Path, load_file, SafetensorError) -> dict:
    if not (d / INDEX_NAME).is_file():
        raise CheckpointError(f"{d} has no {INDEX_NAME}: incomplete checkpoint")
    index = json.loads((d / INDEX_NAME).read_text())
    checksums = index.get("metadata", {}).get("sha256", {})
    state = {}
    for fname in sorted(set(index["weight_map"].values())):
        path = d / fname
        if not path.is_file():
            raise CheckpointError(f"{d}: shard {fname} is missing")
        if fname in checksums and _sha256(path) != checksums[fname]:
            raise CheckpointError(f"{path} is corrupt: its sha256 does not match the index; re-download or "
                                  "re-quantize")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return state


def checkpoint_size(ckpt_dir: str | os.PathLike) -> int:
    """Bytes on disk of the checkpoint's tensor shards."""
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("*.safetensors"))


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
