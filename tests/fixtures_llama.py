"""Shared fixtures: a tiny random LlamaForCausalLM (seconds to calibrate) and a matching toy tokenizer/text."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256


def make_tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    # Larger-than-init weights so quantization error is visible in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def random_samples(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def samples():
    return random_samples()


def make_byte_tokenizer():
    """A byte-level tokenizer with exactly VOCAB=256 ids (one per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
        "to do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
        "conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or "
        "conversations?' ") * 8


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def write_model_and_text(d):
    """d/model (the tiny Llama with its tokenizer, as transformers saves it) and d/text.txt; returns d."""
    make_tiny_llama().save_pretrained(d / "model")
    make_byte_tokenizer().save_pretrained(d / "model")
    (d / "text.txt").write_text(TEXT)
    return d


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A transformers model directory (config, safetensors, tokenizer) holding the tiny Llama."""
    d = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(d)
    make_byte_tokenizer().save_pretrained(d)
    return d
