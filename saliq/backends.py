"""Backend registry: which implementation runs each op, per device.

Backends: `ref` (pure torch, any device), `cpp` (CPU C++), `triton` (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1), `cuda` (CUDA C++). A backend registers the ops it implements; an op it lacks falls
back to the device default. Precedence: `use_backend(...)` context > SALIQ_BACKEND env var > default.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Optional

BACKENDS = ("ref", "cpp", "triton", "cuda")
OPS = ("fake_quant_lwc_fwd", "fake_quant_lwc_bwd", "saliency_sq_error", "packed_matmul", "dequantize",
       "pack", "unpack", "dense_linear", "sparse_addmm")

_impls: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS}
_device_support: dict[str, Callable[[str], bool]] = {
    "ref": lambda device_type: True,
    "cpp": lambda device_type: device_type == "cpu",
    "triton": lambda device_type: device_type == "cuda" or (
        device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"),
    "cuda": lambda device_type: device_type == "cuda",
}
# Default order per device type; the first backend that implements the op wins. A backend may install a
# chooser (op, device_type) -> callable(*args) -> backend name, for dispatch measured by shape.
_default_order = {"cpu": ["cpp", "ref"], "cuda": ["triton", "cuda", "ref"]}
_choosers: dict[tuple[str, str], Callable[..., str]] = {}
# the default's choice per (op, device type) where no chooser decides, as (backend, impl, the backends before it in
# the order, which lacked the op): a decode step resolves hundreds of small calls, and the walk over the order cost
# ~1.5 us each. Cleared by register() and set_chooser(); an entry is also checked against the registry when used,
# so that a registry changed in place (tests patch these dicts) is followed.
_resolved: dict[tuple[str, str], tuple[str, Callable, tuple[str, ...]]] = {}
_state = threading.local()
# use_backend blocks open in any thread: while none is, forced() skips the thread-local lookup
_forcing = 0
_forcing_lock = threading.Lock()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; allowed: {BACKENDS}")
    return name


def register(backend: str, op: str, fn: Callable) -> None:
    """Register `fn` as `backend`'s implementation of `op` (same signature as saliq.ref's function)."""
    _check_backend(backend)
    if op not in OPS:
        raise ValueError(f"op={op!r} is unknown; allowed: {OPS}")
    _impls[backend][op] = fn
    _resolved.clear()


def set_chooser(op: str, device_type: str, chooser: Optional[Callable[..., str]]) -> None:
    """Install (or remove, with None) a shape-based chooser of the default backend for op on a device."""
    if chooser is None:
        _choosers.pop((op, device_type), None)
    else:
        _choosers[(op, device_type)] = chooser
    _resolved.clear()


def available(op: str, device_type: str) -> list[str]:
    """Backends that implement `op` and can run on `device_type`."""
    load_optional_backends()
    return [b for b in BACKENDS if op in _impls[b] and _device_support[b](device_type)]


def forced() -> Optional[str]:
    """The backend forced by use_backend() or SALIQ_BACKEND, if any."""
    name = (getattr(_state, "forced", None) if _forcing else None) or os.environ.get("SALIQ_BACKEND") or None
    return _check_backend(name) if name else None


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force every saliq op inside the block to run on backend `name` (None restores the defaults)."""
    global _forcing
    if name is not None:
        _check_backend(name)
    previous = getattr(_state, "forced", None)
    with _forcing_lock:
        _forcing += 1
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous
        with _forcing_lock:
            _forcing -= 1


# Optional backends register themselves on import; each module is tried once, on the first dispatch.
OPTIONAL_BACKEND_MODULES = ("saliq.cpp_backend", "saliq.triton_backend")
_load_errors: dict[str, str] = {}
_loaded = False


def load_optional_backends() -> dict[str, str]:
    """Import the optional backend modules once; returns {module: error} for those that failed to load."""
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in OPTIONAL_BACKEND_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as exc:  # missing build or missing triton: that backend is unavailable
                _load_errors[module] = f"{type(exc).__name__}: {exc}"
    return dict(_load_errors)


def resolve(op: str, device_type: str, *args) -> Callable:
    """The implementation of `op` to run for tensors on `device_type`; `args` are the op's full arguments
    (a chooser may time candidates on them)."""
    name = forced()
    if name is None:
        hit = _resolved.get((op, device_type))
        if hit is not None and (op, device_type) not in _choosers and _impls[hit[0]].get(op) is hit[1] and (
                not hit[2] or not any(op in _impls[b] for b in hit[2])):
            return hit[1]
    load_optional_backends()
    if name is not None:
        if not _device_support[name](device_type):
            hint = " (set TRITON_INTERPRET=1 to run Triton on the CPU)" if name == "triton" else ""
            raise RuntimeError(f"backend {name!r} cannot run on {device_type} tensors{hint}")
        if op in _impls[name]:
            return _impls[name][op]
    chooser = _choosers.get((op, device_type))
    if chooser is not None and name is None:
        return _impls[chooser(*args)][op]
    order = _default_order.get(device_type, ["ref"])
    winner = next((b for b in order if op in _impls[b] and _device_support[b](device_type)), "ref")
    # Triton runs on the CPU by an environment variable (TRITON_INTERPRET): a choice that may involve it is not kept
    if name is None and not (device_type == "cpu" and "triton" in order):
        before = tuple(order[:order.index(winner)]) if winner in order else tuple(order)
        _resolved[(op, device_type)] = (winner, _impls[winner][op], before)
    return _impls[winner][op]


def _register_ref() -> None:
    from . import packing, ref

    for op in OPS:
        register("ref", op, getattr(packing if op in ("pack", "unpack") else ref, op))


_register_ref()
