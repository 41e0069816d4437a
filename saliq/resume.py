"""Resume bookkeeping of a calibration run: what identifies a run (fingerprints), the work dir's manifest, and
the block-by-block commit that a rerun resumes from (docs/CALIBRATION.md, "Checkpoint and resume").

The work dir holds `run.json` (the manifest: the run's fingerprint and components, written first), one
`block_NNNN.safetensors` per finished block, the next block's inputs `acts_NNNN.safetensors`, and
`progress.json`, written last for each block: the commit point. Every file carries the fingerprint and is
reused only when it matches; each is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

PROGRESS = "progress.json"


class ResumeMismatchError(RuntimeError):
    """The work dir holds a run with other settings."""


# A run is identified by what determines its result: the float model's weights, the calibration samples (token
# ids: text, tokenizer, nsamples, seqlen and seed), the saliency it uses, the compute precision and the settings.
# The fingerprint is the sha256 of those components; every file in the work dir carries it (progress.json and
# the manifest as a field, safetensors files in their metadata) and is reused only when it matches.
FINGERPRINT_VERSION = 1


def _sha256_tensor(h, t: torch.Tensor):
    t = t.detach().contiguous().cpu()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class, config shape and every tensor (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256(f"saliq-model-v{FINGERPRINT_VERSION}|{type(model).__name__}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _sha256_tensor(h, t)
    return h.hexdigest()


def samples_fingerprint(samples: torch.Tensor | None) -> str | None:
    if samples is None:
        return None
    h = hashlib.sha256(f"saliq-samples-v{FINGERPRINT_VERSION}|".encode())
    _sha256_tensor(h, samples.to(torch.int64))
    return h.hexdigest()


def saliency_fingerprint(model_fp: str, samples_fp: str) -> str:
    """The identity of the saliency computed from this model and these samples (it depends on nothing else)."""
    return hashlib.sha256(f"saliq-saliency-v{FINGERPRINT_VERSION}|fisher_diagonal_sum|{model_fp}|{samples_fp}"
                          .encode()).hexdigest()


def tensors_digest(tensors: dict) -> str:
    h = hashlib.sha256(b"saliq-tensors|")
    for k in sorted(tensors):
        h.update(k.encode())
        _sha256_tensor(h, tensors[k])
    return h.hexdigest()


def run_components(cfg, model_fp: str, samples_fp: str | None, saliency_id: str | None,
                   amp: bool) -> dict:
    """Everything a run's result depends on. rtn: the spec and the model; otherwise also the samples, the
    saliency (when the method uses it), the precision (bf16 autocast or fp32) and every setting. The device is
    not part of it: a run may resume on another device (equal up to floating-point differences)."""
    if cfg.method == "rtn":
        return {"version": FINGERPRINT_VERSION, "model": model_fp, "settings": cfg.fingerprint_dict()}
    return {"version": FINGERPRINT_VERSION, "model": model_fp, "data": samples_fp,
            "saliency": saliency_id if cfg.uses_saliency else None,
            "precision": "bf16-autocast" if amp else "fp32", "settings": cfg.fingerprint_dict()}


def fingerprint_of(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()


_COMPONENT_NAMES = {"model": "the model (MODEL)", "data": "the calibration samples (--calib, --nsamples, --seqlen, "
                    "--seed or the tokenizer)", "saliency": "the saliency (--saliency)",
                    "precision": "the precision (--no-amp / --device)", "version": "the saliq fingerprint version"}


def describe_difference(old: dict | None, new: dict) -> str:
    """A short human list of what differs between two run_components dicts."""
    if not isinstance(old, dict) or not old:
        return "unknown settings (not recorded: written by an older saliq, or damaged)"
    so, sn = old.get("settings") or {}, new.get("settings") or {}
    if so.get("method") != sn.get("method"):
        return f"the method ({so.get('method')} -> {sn.get('method')})"
    parts = [label for key, label in _COMPONENT_NAMES.items() if old.get(key) != new.get(key)]
    changed = [f"{k} {so.get(k)!r} -> {sn.get(k)!r}" for k in sorted(set(so) | set(sn)) if so.get(k) != sn.get(k)]
    if changed:
        parts.append("settings: " + ", ".join(changed))
    return "; ".join(parts) if parts else "nothing recorded (same fingerprint)"


MANIFEST = "run.json"


def read_manifest(work_dir) -> dict | None:
    """The work dir's manifest ({"fingerprint", "components", ...}); None when there is none, {} when it is
    unreadable (a run of unknown settings)."""
    path = Path(work_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(work_dir, components: dict, extra: dict | None = None):
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = {"saliq_run": FINGERPRINT_VERSION, "fingerprint": fingerprint_of(components), "components": components,
            **(extra or {})}
    _atomic(work_dir / MANIFEST, lambda p: p.write_text(json.dumps(data, indent=1)))


def check_or_write_manifest(work_dir, components: dict):
    """Refuse a work dir that belongs to another run (ResumeMismatchError naming what differs); write the
    manifest when the work dir has none. A work dir with files but no manifest is refused too."""
    work_dir = Path(work_dir)
    found = read_manifest(work_dir)
    fp = fingerprint_of(components)
    if found is None:
        if work_dir.is_dir() and any(work_dir.iterdir()):
            raise ResumeMismatchError(f"{work_dir} holds files of a calibration run with unknown settings (no "
                                      f"{MANIFEST}); delete it to start afresh")
        write_manifest(work_dir, components)
    elif found.get("fingerprint") != fp:
        raise ResumeMismatchError(
            f"{work_dir} holds an unfinished calibration with other settings or data (differs in: "
            f"{describe_difference(found.get('components'), components)}); rerun with the original settings to "
            "resume, or delete it to start afresh")


def read_safetensors_fingerprint(path) -> str | None:
    """The `fingerprint` entry of a safetensors file's metadata (None: missing file, no entry, unreadable)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (SafetensorError, OSError):
        return None


def _atomic(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class WorkDir:
    """The work dir of one run (identified by `fingerprint`): load what a rerun resumes from, commit a block."""

    def __init__(self, path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def load_progress(self, n_blocks: int) -> dict | None:
        """progress.json of this run (None when absent); refused when it is corrupt or from another run."""
        path = self.path / PROGRESS
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResumeMismatchError(f"{path} is corrupt ({e}); delete {self.path} to start afresh") from e
        if state.get("fingerprint") != self.fingerprint:
            raise ResumeMismatchError(
                f"{self.path} holds an unfinished calibration with other settings or data; delete it (or "
                "choose another output folder) to start afresh, or rerun with the original settings to resume")
        if not 0 <= int(state.get("next_block", -1)) <= n_blocks:
            raise ResumeMismatchError(f"{path} names block {state.get('next_block')!r}, the model has {n_blocks}; "
                                      f"delete {self.path} to start afresh")
        return state

    def load_checked(self, name: str) -> dict:
        """A work-dir safetensors file, refused unless it carries this run's fingerprint."""
        from safetensors.torch import load_file

        path = self.path / name
        found = read_safetensors_fingerprint(path)
        if found != self.fingerprint:
            what = "is missing" if not path.is_file() else (
                "carries no fingerprint" if found is None else "was written by a run with other settings or data")
            raise ResumeMismatchError(f"{path} {what}; the work dir {self.path} cannot be resumed: delete it "
                                      "to start afresh")
        return load_file(str(path))

    def commit_block(self, i: int, block_state: dict, x_fp, x_q, progress: dict):
        """Commit block i: its state, the next block's inputs, then progress.json (the commit point), with the
        caller's `progress` entries (log, timings, settings) and the CPU RNG state."""
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint}
        _atomic(self.path / f"block_{i:04d}.safetensors", lambda p: save_file(
            {k: v.detach().contiguous().cpu() for k, v in block_state.items()}, str(p),
            metadata={**meta, "block": str(i)}))
        _atomic(self.path / f"acts_{i + 1:04d}.safetensors", lambda p: save_file(
            {"x_fp": x_fp.contiguous().cpu(), "x_q": x_q.contiguous().cpu()}, str(p),
            metadata={**meta, "next_block": str(i + 1)}))
        state = {"fingerprint": self.fingerprint, "next_block": i + 1, **progress,
                 "rng": torch.get_rng_state().tolist()}
        _atomic(self.path / PROGRESS, lambda p: p.write_text(json.dumps(state)))
        old = self.path / f"acts_{i:04d}.safetensors"
        if old.exists():
            old.unlink()
