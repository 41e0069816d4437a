"""saliq: saliency-aware ultra-low-bit (2/3/4-bit) quantization of LLaMA-family models."""
import torch  # noqa: F401  (loads libtorch, which saliq._C links against)

from .spec import QuantSpec  # noqa: F401
from .hf_quantizer import install_import_hook as _install_import_hook

# transformers learns quant_method "saliq" (from_pretrained, lm-eval's hf model, PEFT) as soon as it is imported
_install_import_hook()

__version__ = "0.1.0"
__all__ = ["QuantSpec", "save", "load"]


def __getattr__(name):
    # save / load pull in transformers: import them only when asked for
    if name in ("save", "load"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'saliq' has no attribute {name!r}")
