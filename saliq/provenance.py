"""What a result was computed from: the input's sha256 and the versions of the libraries that computed it, recorded
in `--json` results and evaluation files so that a number can be traced and reproduced."""
from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

_PACKAGES = ("saliq", "torch", "transformers", "safetensors", "lm_eval", "peft", "datasets")


def versions(packages=_PACKAGES) -> dict:
    """Installed versions of the packages that take part (those not installed are left out), and Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def file_sha256(path) -> str | None:
    """sha256 of a file, None when `path` is not a file (e.g. a dataset name such as wikitext2)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_record(model_path) -> dict:
    """The evaluated model: its path and, for a saliq checkpoint, the sha256 of its manifest (which fixes every
    byte of it) and its quantization settings."""
    from .checkpoint import MANIFEST_NAME, looks_like_saliq_checkpoint

    p = Path(model_path)
    rec = {"model": str(model_path)}
    if p.is_dir() and looks_like_saliq_checkpoint(p):
        rec["manifest_sha256"] = file_sha256(p / MANIFEST_NAME)
        try:
            from .checkpoint import read_quant_config

            qc = read_quant_config(p)
            rec["quantization"] = {k: qc.get(k) for k in ("method", "bits", "group_size", "symmetric", "lora_rank")}
        except ValueError:
            pass
    elif p.is_file():
        rec["sha256"] = file_sha256(p)
    return rec
