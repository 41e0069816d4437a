"""Launch-configuration choice with a per-GPU cache, so users pay autotuning once per GPU model and shape.

`choose(op, key, candidates, run, device)` returns one of `candidates` (dicts of launch meta-parameters):
- under the Triton interpreter, on a non-CUDA device, or with SALIQ_AUTOTUNE=0: the first candidate (the
  default), since timing the interpreter measures nothing and multi-config autotuning needs a GPU driver;
- otherwise the cached winner for (device name, op, key) (the user's cache, else the table measured on that GPU
  model and shipped in saliq/kernels/configs/), or, on a miss, the fastest candidate measured with CUDA events
  on the caller's own arguments, then written to the cache;
- tuning is bounded: each process spends at most SALIQ_TUNE_BUDGET_S seconds (default 2) measuring
  candidates (every candidate compiles, ~1 s each). Past the budget a miss takes the default candidate without
  recording it, so a first run never stalls and a later run can still tune what this one skipped.

The cache is one JSON file per GPU model under $SALIQ_CACHE/triton-configs (default ~/.cache/saliq), keyed by
op and shape bucket; entries carry the Triton version so an upgrade re-tunes. Keys must be built from shape
buckets (see `m_bucket`) so the number of entries stays small.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton

from .common import is_interpreter

_lock = threading.Lock()
_memory: dict[str, dict] = {}  # device name -> {key: config}
_spent = [0.0]  # seconds this process has spent tuning


def cache_dir() -> Path:
    base = os.environ.get("SALIQ_CACHE") or os.path.join("~", ".cache", "saliq")
    return Path(base).expanduser() / "triton-configs"


def autotune_enabled() -> bool:
    return os.environ.get("SALIQ_AUTOTUNE", "1") != "0"


def tune_budget_s() -> float:
    """Seconds of tuning this process may spend (SALIQ_TUNE_BUDGET_S, default 2; 0 turns tuning off)."""
    value = os.environ.get("SALIQ_TUNE_BUDGET_S", "2")
    try:
        budget = float(value)
    except ValueError:
        raise ValueError(f"SALIQ_TUNE_BUDGET_S={value!r} must be a number of seconds >= 0") from None
    if not budget >= 0:
        raise ValueError(f"SALIQ_TUNE_BUDGET_S={value!r} must be a number of seconds >= 0")
    return budget


def m_bucket(m: int) -> int:
    """Rows bucket of a matmul: exact up to 16 (decode), then the next power of two, capped at 8192."""
    if m <= 16:
        return max(m, 1)
    return min(triton.next_power_of_2(m), 8192)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _file(dev_name: str) -> Path:
    return cache_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", dev_name) + ".json")


SHIPPED = Path(__file__).resolve().parent / "configs"  # measured per-GPU tables that ship with the package


def _shipped(dev_name: str) -> dict:
    """Entries measured on this GPU model and shipped in saliq/kernels/configs/<gpu>.json: launch parameters
    stay valid across Triton versions, so they apply to any (a config that fails to launch is skipped)."""
    try:
        data = json.loads((SHIPPED / _file(dev_name).name).read_text())
        return dict(data.get("entries", {})) if data.get("device") == dev_name else {}
    except (OSError, ValueError):
        return {}


def _load(dev_name: str) -> dict:
    if dev_name not in _memory:
        entries = _shipped(dev_name)
        try:
            data = json.loads(_file(dev_name).read_text())
            if data.get("triton") == triton.__version__:
                entries.update(data.get("entries", {}))  # the user's own measurements win
        except (OSError, ValueError):
            pass  # no cache yet, or an unreadable one: tune again
        _memory[dev_name] = entries
    return _memory[dev_name]


def _save(dev_name: str) -> None:
    path = _file(dev_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"device": dev_name, "triton": triton.__version__, "entries": _memory[dev_name]},
                          indent=1, sort_keys=True)
        # write then rename: concurrent processes never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still works, it just tunes again next start


def lookup(op: str, key: Sequence, device) -> Optional[dict]:
    with _lock:
        return _load(device_name(device)).get(_key(op, key))


def record(op: str, key: Sequence, config: dict, device) -> None:
    dev = device_name(device)
    with _lock:
        _load(dev)[_key(op, key)] = config
        _save(dev)


def _key(op: str, key: Sequence) -> str:
    return op + "|" + ",".join(str(k) for k in key)


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, rep: int = 10,
                 before_each: Optional[Callable[[], object]] = None) -> float:
    """Median time of fn() in milliseconds, measured with CUDA events (the caller's stream).

    before_each runs untimed before every measured call (e.g. a benchmark's L2 flush)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        if before_each is not None:
            before_each()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def choose(op: str, key: Sequence, candidates: Sequence[dict], run: Callable[[dict], object], device) -> dict:
    """The launch configuration for `op` at `key` (see the module docstring)."""
    device = torch.device(device)
    if is_interpreter() or device.type != "cuda" or not autotune_enabled() or len(candidates) == 1:
        return candidates[0]
    cached = lookup(op, key, device)
    if cached is not None and cached in candidates:
        return cached
    budget = tune_budget_s()
    if _spent[0] >= budget:
        return candidates[0]  # out of tuning time: the default, not recorded (a later run may tune it)
    start = time.perf_counter()
    best, best_ms, complete = candidates[0], float("inf"), True
    for i, cfg in enumerate(candidates):
        if i and _spent[0] + time.perf_counter() - start >= budget:
            complete = False
            break
        try:
            ms = cuda_time_ms(lambda: run(cfg))
        except Exception:  # a config that does not compile or fit on this GPU (shared memory, registers)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _spent[0] += time.perf_counter() - start
    if complete:
        record(op, key, best, device)
    return best
