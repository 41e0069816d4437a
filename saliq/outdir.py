"""The --out policy: what an output directory may be (new, empty, or saliq's own run of the same settings) and
what a rerun does with it (resume, nothing to do, refuse, or replace with --overwrite). docs/CALIBRATION.md,
"Checkpoint and resume"."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checks import UsageError, check_writable_dir
from .console import oneline

WORK_DIR = ".calib"  # resume state inside --out (docs/CALIBRATION.md, "Checkpoint and resume")


CHECKPOINT_MANIFEST = "saliq-manifest.json"  # the file list hf.save writes into every checkpoint


@dataclass
class OutState:
    """What --out holds: `finished` / `unfinished` are None (nothing), {} (saliq's, unknown settings) or the
    recorded {"fingerprint", "components"} of a saliq checkpoint / of the run in OUT/.calib."""

    finished: dict | None = None
    unfinished: dict | None = None


@contextlib.contextmanager
def out_lock(out: Path):
    """Hold an exclusive lock on --out for the whole run, so two runs never write one directory at once.

    The lock file lives in a per-user directory under the system's temp dir, named by the resolved path, so
    it works before --out exists and leaves nothing behind in the user's directories. The OS releases the
    lock when the process dies, so a killed run never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not serialised
        yield
        return
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:32]
    lock_dir = Path(tempfile.gettempdir()) / f"saliq-locks-{os.getuid()}"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise UsageError(f"--out {str(out)!r} is being written by another saliq run (pid {holder}); wait for it "
                             "to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def inspect_out(out: Path, model_path, overwrite: bool) -> OutState:
    """--out policy, the part that needs no fingerprint: not the model's directory (nor inside it, nor holding
    it), a directory, writable, and new, empty or written by saliq (a saliq config.json or an OUT/.calib work
    dir); anything else is refused, --overwrite or not."""
    from . import hf
    from .calibrate import read_manifest

    o, m = out.resolve(), Path(model_path).resolve()
    if o == m or (m.is_dir() and o.is_relative_to(m)):
        what = "MODEL itself" if o == m else f"inside the model directory {str(model_path)!r}"
        raise UsageError(f"--out {str(out)!r} is {what}; choose a directory outside the model")
    if m.is_relative_to(o):
        raise UsageError(f"--out {str(out)!r} contains the model {str(model_path)!r}; choose a directory that does "
                         "not hold the model")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; pass a directory")
    if Path.cwd().resolve().is_relative_to(o):  # the checkpoint is put in place by renaming a directory
        raise UsageError(f"--out {str(out)!r} is (or contains) the current directory; choose another directory")
    check_writable_dir(out, "--out")
    entries = sorted(e.name for e in out.iterdir()) if out.is_dir() else []
    if not entries:
        return OutState()
    state = OutState()
    config = out / "config.json"
    if config.is_file():
        try:
            qc = json.loads(config.read_text()).get("quantization_config") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            qc = {}
        if isinstance(qc, dict) and qc.get("quant_method") == "saliq":
            run = qc.get("run")
            state.finished = run if isinstance(run, dict) else {}
    elif (out / getattr(hf, "MANIFEST_NAME", CHECKPOINT_MANIFEST)).is_file():  # a saliq checkpoint, config lost
        state.finished = {}
    if (out / WORK_DIR).is_dir():
        state.unfinished = read_manifest(out / WORK_DIR) or {}
    if state.finished is None and state.unfinished is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"--out {str(out)!r} is a non-empty directory saliq did not write ({shown}); choose a new "
                         "or empty directory (--overwrite only replaces a saliq checkpoint)")
    return state


def decide_out(out: Path, state: OutState, components: dict, overwrite: bool) -> str:
    """'noop' (OUT already holds this checkpoint), 'resume' (OUT/.calib holds this run, or nothing to resume),
    or 'replace' (--overwrite: OUT/.calib of another run is discarded). Refuses other settings without
    --overwrite, naming what differs."""
    from .calibrate import describe_difference, fingerprint_of

    fp = fingerprint_of(components)
    damage = None
    if state.finished is not None and state.finished.get("fingerprint") == fp:
        damage = checkpoint_damage(out)
        if damage is None:
            return "noop"
    problems = []
    if damage is not None:
        problems.append(f"a damaged saliq checkpoint of these settings ({damage})")
    elif state.finished is not None:
        problems.append("a saliq checkpoint made with other settings (differs in: "
                        f"{describe_difference(state.finished.get('components'), components)})")
    stale = state.unfinished is not None and state.unfinished.get("fingerprint") != fp
    if stale:
        problems.append("an unfinished run with other settings (differs in: "
                        f"{describe_difference(state.unfinished.get('components'), components)})")
    if problems and not overwrite:
        raise UsageError(f"--out {str(out)!r} holds {' and '.join(problems)}; rerun with those settings to resume "
                         "or reuse it, pass --overwrite to replace it, or choose another --out")
    return "replace" if stale else "resume"


def checkpoint_damage(out: Path) -> str | None:
    """Why the checkpoint in `out` fails the loader's verification (every file against its manifest), or None."""
    from . import hf

    verify = getattr(hf, "verify", None)  # hf.save / checkpoint verification (saliq.checkpoint)
    if verify is None:
        return None
    try:
        verify(out)
    except hf.CheckpointError as e:
        return oneline(e)
    return None
