"""saliq: saliency-aware ultra-low-bit (2/3/4-bit) quantization of LLaMA-family models."""
from .spec import QuantSpec  # noqa: F401

__version__ = "0.1.0"
