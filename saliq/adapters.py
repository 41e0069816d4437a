"""The calibrated LoRA of a saliq checkpoint as a standard PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors), and the LoRA-free base it applies to. Writing needs no PEFT; PEFT and vLLM read it.

On the base, the adapter adds `(alpha / r) B A x` to `x What^T + bias`: the same sum QuantLinear computes with its
own LoRA (docs/FORMAT.md, "PEFT adapters").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .nn import QuantLinear

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_from_model(model: nn.Module) -> tuple[dict, dict]:
    """(PEFT LoraConfig kwargs, adapter tensors) of the calibrated LoRA inside `model`'s QuantLinear layers.
    Layers without LoRA are not targeted; per-layer ranks / alphas that differ from the most common go to PEFT's
    rank_pattern / alpha_pattern."""
    from collections import Counter

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.lora_A is not None}
    if not layers:
        raise ValueError("the model has no LoRA in its QuantLinear layers (quantized with --method rtn or "
                         "--lora-rank 0?): there is no adapter to export")
    r = Counter(m.lora_rank for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(float(m.lora_alpha) for m in layers.values()).most_common(1)[0][0]
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    config = dict(r=r, lora_alpha=alpha, target_modules=short_target_modules(model, layers), lora_dropout=0.0,
                  bias="none",
                  task_type="CAUSAL_LM",
                  rank_pattern={n: m.lora_rank for n, m in layers.items() if m.lora_rank != r},
                  alpha_pattern={n: float(m.lora_alpha) for n, m in layers.items() if float(m.lora_alpha) != alpha})
    return config, tensors


def short_target_modules(model: nn.Module, names) -> list:
    """Leaf names (q_proj, ...) instead of full module names when every QuantLinear of such a name is targeted:
    the form servers such as vLLM expect; the full names otherwise."""
    names = set(names)
    by_leaf: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            by_leaf.setdefault(name.rpartition(".")[2], set()).add(name)
    leaves = {n.rpartition(".")[2] for n in names}
    if all(by_leaf.get(leaf, set()) <= names for leaf in leaves):
        return sorted(leaves)
    return sorted(names)


def write_adapter(out: str | os.PathLike, config_kwargs: dict, tensors: dict, base_model: str | None) -> Path:
    """adapter_config.json and adapter_model.safetensors into `out`. The config holds PEFT's LoRA fields that
    describe this adapter; PEFT fills the others with its defaults."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": config_kwargs["task_type"], "base_model_name_or_path": base_model,
           "revision": None, "inference_mode": True, "r": config_kwargs["r"],
           "lora_alpha": config_kwargs["lora_alpha"], "target_modules": config_kwargs["target_modules"],
           "rank_pattern": config_kwargs["rank_pattern"], "alpha_pattern": config_kwargs["alpha_pattern"],
           "lora_dropout": config_kwargs["lora_dropout"], "bias": config_kwargs["bias"], "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None}
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def export_adapter(ckpt: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    """The calibrated LoRA of checkpoint `ckpt` as a PEFT adapter in `out`, and the LoRA-free base it applies to
    as a saliq checkpoint in `base` (default `out/base`), named by the adapter's base_model_name_or_path:
    `PeftModel.from_pretrained(saliq.load(base)[0], out)` computes what `saliq.load(ckpt)` does."""
    import shutil

    from . import serialize
    from .checkpoint import _mkdir_unique

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out {str(out)!r} exists and is not an empty directory; choose a new directory")
    base = Path(base) if base is not None else out / "base"
    model, tok = serialize.load(ckpt)
    config_kwargs, tensors = adapter_from_model(model)
    serialize.without_lora(model)
    final_base = str(Path(os.path.abspath(base)))
    # everything is written into a temporary sibling of `out` and renamed into place once complete
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdir_unique(out.parent, f"{out.name}.tmp-")  # honours the umask, unlike tempfile.mkdtemp
    try:
        inside = os.path.commonpath([final_base, os.path.abspath(out)]) == os.path.abspath(out)
        serialize.save(model, tmp / os.path.relpath(final_base, os.path.abspath(out)) if inside else base, tok)
        write_adapter(tmp, config_kwargs, tensors, final_base)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"adapter": str(out), "base": str(base), "layers": len(tensors) // 2,
            "r": config_kwargs["r"], "lora_alpha": config_kwargs["lora_alpha"],
            "adapter_bytes": (out / ADAPTER_WEIGHTS_NAME).stat().st_size,
            "config": json.loads((out / ADAPTER_CONFIG_NAME).read_text())}
