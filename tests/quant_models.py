"""Tiny quantized Llamas for the checkpoint-format tests: RTN QuantLinear layers, optionally with a random LoRA."""
from __future__ import annotations

import torch

from fixtures_llama import make_tiny_llama
from saliq import hf
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec


def make_quant_llama(bits: int = 2, lora_rank: int = 4, seed: int = 0, group_size: int = 32):
    """The tiny Llama of fixtures_llama with every block linear an RTN QuantLinear (and a LoRA of `lora_rank`
    with non-zero B, so that it changes the outputs)."""
    model = make_tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            q = QuantLinear.from_linear(lin, QuantSpec(bits, group_size))
            if lora_rank:
                q = QuantLinear(q.packed, q.bias, torch.randn(lora_rank, lin.in_features, generator=g) * 0.05,
                                torch.randn(lin.out_features, lora_rank, generator=g) * 0.05, 16.0, q.spec)
            hf.set_submodule(block, name, q)
    return model
