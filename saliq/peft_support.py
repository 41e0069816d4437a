"""PEFT: a LoRA layer for QuantLinear, as PEFT has for HQQ and GPTQ layers, so that get_peft_model and
PeftModel.from_pretrained accept saliq models for further fine-tuning.

`register()` teaches PEFT's LoRA dispatch to wrap QuantLinear; `import saliq` runs it as soon as PEFT's LoRA module
is imported (saliq/hf_quantizer.py, install_import_hook), and importing this module runs it too. PEFT's
"all-linear" shortcut only finds torch.nn.Linear: name the projections (`target_modules=["q_proj", ...]`).

The calibrated LoRA leaves a checkpoint as a PEFT adapter through saliq/adapters.py (`saliq export-adapter`).
"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .nn import QuantLinear

class SaliqLoraLinear(nn.Module, LoraLayer):
    """LoRA on a QuantLinear: y = base(x) + sum over active adapters of scale * B(A(dropout(x))). The packed
    weights (and the base layer's own LoRA, when it has one) stay frozen buffers; only the adapters train."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported on saliq QuantLinear layers; allowed: lora_bias=False")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module):
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        if config.use_dora or getattr(config, "velora_config", None) is not None:
            raise ValueError("use_dora / VeLoRA are not supported on saliq QuantLinear layers (they need the dense "
                             "weight); allowed: plain LoRA")
        return None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("a LoRA adapter cannot be merged into saliq's packed weights without re-quantizing them; "
                         "keep the adapter separate (it costs two small matmuls per layer)")

    def unmerge(self) -> None:
        raise ValueError("saliq QuantLinear adapters are never merged, so there is nothing to unmerge")

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            x_a = self._cast_input_dtype(x, lora_A.weight.dtype)
            update = lora_B(lora_A(self.lora_dropout[active_adapter](x_a))) * self.scaling[active_adapter]
            result = result + update.to(out_dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _dispatch(target, adapter_name, config, **kwargs):
    """PEFT dispatcher: a SaliqLoraLinear for a QuantLinear target, None for anything else."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if isinstance(base, QuantLinear):
        return SaliqLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def register():
    """Put saliq's dispatcher in front of PEFT's default LoRA dispatcher (idempotent). PEFT's LoRA model looks its
    dispatchers up by name on every call, so wrapping the default one reaches get_peft_model, PeftModel.from_pretrained
    and transformers' load_adapter alike."""
    import importlib

    lora_model = importlib.import_module("peft.tuners.lora.model")  # also while peft.tuners.lora is being imported
    default = lora_model.dispatch_default
    if getattr(default, "_saliq", False):
        return

    def dispatch_default(target, adapter_name, config, **kwargs):
        return _dispatch(target, adapter_name, config, **kwargs) or default(target, adapter_name, config, **kwargs)

    dispatch_default._saliq = True
    lora_model.dispatch_default = dispatch_default


register()
