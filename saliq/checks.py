"""Checks of the user's inputs (paths, texts, numbers, devices) before any work, each failing with one line
that names the argument, the value and what is allowed."""
from __future__ import annotations

import json
import os
from pathlib import Path


class UsageError(Exception):
    """Bad arguments found after parsing; the message says what to do."""


# ---------------------------------------------------------------- helpers
def device_of(arg):
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError as e:
        raise UsageError(f"--device {arg!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg!r}: CUDA is not available here; use --device cpu")
    return str(dev)


def resolve_model(arg: str, flag: str = "MODEL") -> str:
    """A local path as it is; a model id `org/name` that is not a local path: its snapshot in the Hugging Face
    cache (downloaded when the hub is reachable; HF_HUB_OFFLINE=1 uses the cache only)."""
    from .checkpoint import CheckpointError
    from .hub import is_repo_id, resolve

    if Path(arg).exists() or not is_repo_id(arg):
        return arg
    try:
        return str(resolve(arg))
    except CheckpointError as e:
        raise UsageError(f"{flag} {arg!r}: {e}") from e


def check_model_path(path: str):
    p = Path(path)
    if not p.exists():
        raise UsageError(f"MODEL {path!r} does not exist; pass a transformers model directory, a .gguf file or "
                         "a saliq checkpoint")
    if p.is_file() and p.suffix != ".gguf":
        raise UsageError(f"MODEL {path!r} is a file but not a .gguf; pass a .gguf file or a model directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(f"MODEL {path!r} has no config.json; pass a transformers model directory")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in TOKENIZER_FILES)


def check_float_model(path: str, need_tokenizer: bool, why: str):
    """MODEL must be a float model saliq can load: not a (saliq or other) quantized checkpoint, with weights,
    and with tokenizer files when `need_tokenizer` (`why` says what needs them). Path-level checks only, nothing
    is loaded."""
    check_model_path(path)
    p = Path(path)
    if not p.is_dir():
        return  # a .gguf file: dequantized to float on load, tokenizer inside
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"MODEL {path!r}: config.json is not readable JSON ({e}); pass a transformers model "
                         "directory") from e
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "saliq":
        raise UsageError(f"MODEL {path!r} is a saliq checkpoint, already quantized ({qc.get('method')} "
                         f"W{qc.get('bits')} g{qc.get('group_size')}); quantize the original float model instead")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise UsageError(f"MODEL {path!r} is already quantized (quantization_config.quant_method {method!r}); "
                         "saliq quantizes float models: pass the unquantized model")
    for index in WEIGHT_INDEXES:
        if (p / index).is_file():
            try:
                shards = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise UsageError(f"MODEL {path!r}: {index} is not a readable weight index ({e})") from e
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise UsageError(f"MODEL {path!r}: {len(missing)} weight file(s) listed in {index} are missing "
                                 f"(e.g. {missing[0]}); the model directory is incomplete")
            break
    else:
        if not any((p / f).is_file() for f in WEIGHT_FILES):
            raise UsageError(f"MODEL {path!r} has a config.json but no weights ({' or '.join(WEIGHT_FILES)}, or "
                             f"shards with {WEIGHT_INDEXES[0]}); pass a complete model directory")
    if need_tokenizer and not has_tokenizer(p):
        raise UsageError(f"MODEL {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); {why} needs "
                         "one: add the tokenizer files to the directory")


def check_text(arg: str, flag: str):
    """A local text file must exist and be UTF-8 text (binary and other encodings are refused)."""
    from .data import HUB_DATASETS, DataError, read_text_file

    if arg in HUB_DATASETS:
        return
    if not Path(arg).is_file():
        raise UsageError(f"{flag} {arg!r} is not a file; pass a UTF-8 text file (or {' / '.join(HUB_DATASETS)})")
    try:
        read_text_file(arg)
    except DataError as e:
        raise UsageError(f"{flag}: {e}") from e


def check_positive(value, flag: str, minimum: int = 1):
    if value is not None and value < minimum:
        raise UsageError(f"{flag}={value} must be >= {minimum}")


def check_number(value, flag: str, minimum: float | None = None, above: float | None = None, note: str = ""):
    """A finite float, optionally >= minimum or > above (argparse accepts nan and inf)."""
    import math

    if value is None:
        return
    allowed = ("a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
               + (f" > {above:g}" if above is not None else "") + note)
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (above is not None
                                                                                 and value <= above):
        raise UsageError(f"{flag}={value} must be {allowed}")


def check_writable_dir(path, flag: str):
    """`path` (a directory, existing or to be created) can be written: the nearest existing ancestor is a
    directory in which a file can be created."""
    import tempfile

    target = Path(path).absolute()
    anc = target
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {str(path)!r} cannot be created: {str(anc)!r} is a file, not a directory")
    reason = None
    if not os.access(anc, os.W_OK | os.X_OK):
        reason = "permission denied"
    else:
        try:
            fd, probe = tempfile.mkstemp(dir=anc, prefix=".saliq-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror or str(e)
    if reason:
        where = "" if anc == target else f" (its parent {str(anc)!r})"
        raise UsageError(f"{flag} {str(path)!r}{where} is not writable: {reason}; choose a writable directory")


def check_saliency_file(path: str, flag: str):
    """An existing --saliency / saliency --out path must be a saliency file saliq wrote (it is read or
    replaced); a new one needs a writable directory."""
    from .saliency import saliency_metadata

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; pass a .safetensors file path")
    if p.exists():
        if saliency_metadata(p) is None:
            raise UsageError(f"{flag} {path!r} exists but is not a saliency file saliq wrote; it is left alone: "
                             "pass a saliency file from `saliq saliency` or a new path")
    else:
        check_writable_dir(p.parent, f"{flag} {path!r}: directory")


def check_context_length(model, seqlen: int, flag: str):
    """Windows longer than the model's context (max_position_embeddings) run, but on positions it never saw
    in training: the perplexity or calibration would be quietly wrong."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise UsageError(f"{flag} {seqlen} is longer than the model's context of {limit} tokens "
                         f"(max_position_embeddings); choose {flag} <= {limit}")
