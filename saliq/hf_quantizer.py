"""transformers integration: the `saliq` quantization config and HfQuantizer, so that
`AutoModelForCausalLM.from_pretrained(checkpoint)` builds QuantLinear layers on the meta device and loads the packed
tensors into them, after the same manifest verification as `saliq.load`.

Registration: transformers learns `quant_method: "saliq"` when this module's `register()` runs. `import saliq` arranges
that without importing transformers itself (which costs seconds): if transformers' quantizer registry is already
imported it registers at once, otherwise a post-import hook registers as soon as it is. PEFT's LoRA dispatch learns
QuantLinear the same way (saliq/peft_support.py).

Without saliq, transformers skips a quantization method it does not know and would build a float model with
randomly initialised linears. A saliq checkpoint therefore names a weights index that does not exist
(`config.json: transformers_weights`, WEIGHTS_GUARD): transformers alone fails on it with an error naming that
file; the quantizer below swaps in the real index before any file is resolved.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

from .checkpoint import (CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, QUANT_METHOD, CheckpointError,
                         check_quant_config, verify)

WEIGHTS_GUARD = "saliq-checkpoint--import-saliq-to-load.safetensors.index.json"
_REGISTRY_MODULE = "transformers.quantizers.auto"

# A checkpoint `saliq.load` verified just before it calls from_pretrained: the quantizer does not hash it twice.
_verified: contextvars.ContextVar = contextvars.ContextVar("saliq_verified_checkpoint", default=None)

_classes: dict = {}


# ---------------------------------------------------------------- registration
def register() -> tuple[type, type]:
    """Register SaliqConfig and SaliqHfQuantizer with transformers for quant_method "saliq" (idempotent).
    Returns (config class, quantizer class)."""
    if _classes:
        return _classes["config"], _classes["quantizer"]
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _define_classes()
    # an entry of that name from an earlier import of this module (a reload) is replaced, never duplicated
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_cls
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_cls
    _classes.update(config=config_cls, quantizer=quantizer_cls)
    return config_cls, quantizer_cls


def _register_peft():
    from .peft_support import register as register_peft

    register_peft()


# module -> what to run once it has been executed: transformers' quantizer registry, PEFT's LoRA dispatch
_AFTER_IMPORT = {_REGISTRY_MODULE: register, "peft.tuners.lora.model": _register_peft}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration for a module of _AFTER_IMPORT right after that module has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisteringLoader(spec.loader, _AFTER_IMPORT[fullname])
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner, then):
        self.inner, self.then = inner, then

    def __getattr__(self, name):  # get_source, is_package ... of the wrapped loader
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        sys.modules[module.__name__] = module  # the registration imports it by name
        self.then()


def install_import_hook():
    """Make transformers know saliq checkpoints, and PEFT saliq's LoRA layer, from now on: register at once where
    the module is loaded already, else as soon as it is (called by `import saliq`)."""
    for name, then in _AFTER_IMPORT.items():
        if name in sys.modules:
            then()
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


@contextlib.contextmanager
def verified(ck):
    """Within this block the quantizer trusts `ck` (a Checkpoint from checkpoint.verify) for its directory."""
    token = _verified.set(ck)
    try:
        yield
    finally:
        _verified.reset(token)


# ---------------------------------------------------------------- the classes
def _define_classes():
    """Defined on registration: their base classes live in transformers, which saliq imports only when needed."""
    import torch
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SaliqConfig(QuantizationConfigMixin):
        """`quantization_config` of a saliq checkpoint (docs/FORMAT.md, "Checkpoint files"): the packed format's
        settings and, per quantized linear, its LoRA rank, alpha and bias. Every field the loader uses is
        type-checked here; other entries (calibration settings, run fingerprint ...) are kept as they are."""

        def __init__(self, **fields):
            fields.setdefault("quant_method", QUANT_METHOD)
            check_quant_config({"quantization_config": fields}, Path(CONFIG_NAME))
            self.__dict__.update(copy.deepcopy(fields))

        def to_dict(self) -> dict:
            return copy.deepcopy(self.__dict__)

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        @property
        def spec(self):
            from .spec import QuantSpec

            return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    class SaliqHfQuantizer(HfQuantizer):
        """Loads saliq checkpoints: verifies the files against the manifest, replaces the listed linears by empty
        QuantLinear layers on the meta device, checks every tensor's name, shape and dtype in the shards' headers,
        and lets transformers fill the buffers (no float weight is ever materialised)."""

        requires_calibration = True  # only pre-quantized checkpoints; saliq quantizes with `saliq quantize`
        quantization_config: SaliqConfig

        def validate_environment(self, device_map=None, **kwargs):
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("device_map: saliq layers cannot be offloaded to 'disk'; allowed: CPU and GPU "
                                 "devices")

        def update_attn_implementation(self, config):
            # the only hook that sees the config before transformers resolves the weight files: lift the guard
            if getattr(config, "transformers_weights", None) == WEIGHTS_GUARD:
                config.transformers_weights = INDEX_NAME
            return config

        def preprocess_model(self, model, dtype=None, **kwargs):
            self._dtype = dtype  # the base class does not pass it on
            return super().preprocess_model(model, dtype=dtype, **kwargs)

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .checkpoint import module_storage
            from .nn import QuantLinear
            from .spec import QuantSpec

            if not checkpoint_files:
                raise CheckpointError("a saliq model loads from the files of its checkpoint (with their manifest), "
                                      "not from a state_dict")
            ck = _checkpoint_of(checkpoint_files)
            qc = self.quantization_config
            if qc.to_dict() != ck.quant_config:
                raise CheckpointError(f"{ck.dir / CONFIG_NAME}: quantization_config differs from the verified "
                                      "file's; load the checkpoint without overriding it")
            spec = qc.spec
            dtype = getattr(self, "_dtype", None)
            dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
            for name, mq in qc.modules.items():
                try:
                    lin = model.get_submodule(name)
                except AttributeError:
                    raise CheckpointError(f"{ck.dir / CONFIG_NAME}: lists quantized module {name!r}, which the model "
                                          "does not have") from None
                if not isinstance(lin, nn.Linear):
                    raise CheckpointError(f"{ck.dir / CONFIG_NAME}: lists quantized module {name!r}, which is not a "
                                          "linear layer")
                st = module_storage(mq)
                mspec = spec if st["bits"] is None else QuantSpec(st["bits"], spec.group_size, spec.symmetric)
                q = QuantLinear.empty(lin.in_features, lin.out_features, mspec, bias=bool(mq["bias"]),
                                      lora_rank=int(mq["lora_rank"]), lora_alpha=float(mq["lora_alpha"]),
                                      dtype=dtype, device="meta", reserved=st["reserved"],
                                      zeros_storage=st["zeros_storage"], reserved_dtype=st["reserved_dtype"])
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, q)
            expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
            ck.check_tensors(expected, optional=_tied_names(model))

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .nn import QuantLinear, use_dense_linears

            for name, m in model.named_modules():
                if isinstance(m, QuantLinear):
                    _check_loaded(name, m)
            attach_save_pretrained(model)
            use_dense_linears(model)  # the float LM head decodes with saliq's multi-threaded GEMV on the CPU
            return model

        def _dequantize(self, model, dtype=None):
            """`model.dequantize()`: every QuantLinear becomes an nn.Linear holding What + (alpha / r) B A."""
            from .nn import QuantLinear

            for name, m in list(model.named_modules()):
                if isinstance(m, QuantLinear):
                    w = m.dequantized_weight().float()
                    if m.lora_A is not None:
                        w = w + m.lora_scale * (m.lora_B.float() @ m.lora_A.float())
                    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                                    dtype=dtype or m.scales.dtype)
                    with torch.no_grad():
                        lin.weight.copy_(w)
                        if m.bias is not None:
                            lin.bias.copy_(m.bias)
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, lin)
            if "save_pretrained" in model.__dict__:  # transformers' own writer again, for the float model
                del model.save_pretrained
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return True  # adapters on top (PEFT); the packed weights themselves are buffers

        @property
        def is_compileable(self) -> bool:
            return True

    return SaliqConfig, SaliqHfQuantizer


def _tied_names(model) -> set:
    """Tensor names that transformers fills by tying (e.g. lm_head.weight from the embeddings); their sources are
    still required."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set()


def _check_loaded(name, m):
    """QuantLinear checks its buffers once, when built, and trusts them afterwards: check the loaded ones."""
    from . import validate

    if any(t.is_meta for k, t in m.named_buffers() if not k.endswith(("_i32", "_correction"))):
        raise CheckpointError(f"{name}: some packed tensors were not loaded")
    try:
        if m.reserved:
            validate.reserved_weights(*m.sparse, m.out_features, m.in_features)
        m.finish_loading(check=True)  # int8 zero points widened, checked, reserved-weight corrections derived
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


def _checkpoint_of(checkpoint_files):
    """The verified checkpoint the files transformers is about to read belong to; they must be exactly its
    shards (a stray model.safetensors next to the index is never read)."""
    d = Path(os.path.abspath(checkpoint_files[0])).parent
    ck = _verified.get()
    if ck is None or Path(os.path.abspath(ck.dir)) != d:
        from .hub import complete_snapshot

        complete_snapshot(d)
        ck = verify(d, need={GENERATION_CONFIG_NAME})
    files = {os.path.abspath(f) for f in checkpoint_files}
    if files != {os.path.abspath(d / s) for s in ck.shards}:
        raise CheckpointError(f"{d}: transformers would read {sorted(os.path.relpath(f, d) for f in files)}, the "
                              f"checkpoint's manifest covers {ck.shards}; remove the stray files")
    return ck


# ---------------------------------------------------------------- saving
def attach(model, quant_config: dict):
    """Give an in-memory model (built by calibration) the state from_pretrained gives a loaded one:
    `config.quantization_config`, `hf_quantizer`, and `save_pretrained` writing a saliq checkpoint."""
    config_cls, quantizer_cls = register()
    cfg = config_cls(**quant_config)
    model.config.quantization_config = cfg
    model.hf_quantizer = quantizer_cls(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    attach_save_pretrained(model)


def attach_save_pretrained(model):
    """`model.save_pretrained(dir)` writes a saliq checkpoint (saliq.save: manifest, atomic replace), which
    from_pretrained and saliq.load read back; transformers' own writer would leave out the manifest."""
    import types

    model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(model, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                     max_shard_size="5GB", safe_serialization: bool = True, variant=None, **kwargs):
    from .serialize import save

    if not is_main_process:
        return
    for arg, value, allowed in (("state_dict", state_dict, None), ("push_to_hub", push_to_hub, False),
                                ("variant", variant, None), ("safe_serialization", safe_serialization, True)):
        if value != allowed and not (arg == "state_dict" and value is None):
            raise ValueError(f"save_pretrained({arg}={value!r}): a saliq model is saved as a saliq checkpoint; "
                             f"allowed: {arg}={allowed!r} (to upload, save, then push the directory with "
                             "huggingface_hub.upload_folder, or call model.push_to_hub)")
    if isinstance(max_shard_size, str):
        from transformers.utils.hub import convert_file_size_to_int

        max_shard_size = convert_file_size_to_int(max_shard_size)
    save(model, save_directory, max_shard_bytes=int(max_shard_size))
