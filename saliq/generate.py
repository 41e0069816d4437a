"""Text generation: stream a completion from a saliq checkpoint or a float model, and time prefill and decode.

`saliq generate` is built on `generate_text`, which runs transformers' own `model.generate` under
`torch.inference_mode()` with a streamer that prints tokens as they come and notes when each arrives:

- prefill: from the moment `generate` hands the prompt to the streamer until the first new token (the forward
  pass over the whole prompt, plus choosing one token);
- decode: from the first new token to the last, i.e. `new_tokens - 1` single-token steps.

So the two rates are those of the model's own `generate` loop, the same numbers a script calling
`model.generate` would see (benchmarks/generate_cpu.py measures both ways in one run).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, TextIO

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stop: str  # "eos" (an end-of-sequence token) or "length" (--max-new-tokens reached)
    token_ids: list = field(default_factory=list, repr=False)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        decode = (f"{self.new_tokens - 1} decode steps at {self.decode_tokens_per_s:.1f} tokens/s "
                  f"({self.decode_seconds:.2f} s)" if self.new_tokens > 1 else "no decode steps")
        stop = "end of sequence" if self.stop == "eos" else "--max-new-tokens reached"
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_tokens_per_s:.1f} tokens/s "
                f"({self.prefill_seconds:.2f} s); {self.new_tokens} new tokens, {decode}; stopped: {stop}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        d.update(prefill_tokens_per_s=round(self.prefill_tokens_per_s, 3),
                 decode_tokens_per_s=round(self.decode_tokens_per_s, 3))
        return d


def _timed_streamer(tokenizer, out: Optional[TextIO]):
    """A transformers TextStreamer that writes to `out` (None: nowhere) and notes when the prompt and each new token
    arrive (generate hands it the prompt first, then every token as soon as it is chosen)."""
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.prompt_time: Optional[float] = None
            self.token_times: list[float] = []
            self.pieces: list[str] = []

        def put(self, value):
            now = time.perf_counter()
            if self.prompt_time is None:
                self.prompt_time = now
            else:
                self.token_times.append(now)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.pieces.append(text)
            if out is not None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

    return TimedStreamer()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, L] token ids of the prompt; with `chat`, the prompt as one user message in the tokenizer's chat template,
    followed by the assistant's turn."""
    if chat:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generation_config_for(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The model's generation config with our sampling settings: greedy when temperature is 0, otherwise sampling
    at `temperature` with nucleus `top_p` (no top-k cut)."""
    import copy

    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens = max_new_tokens
    cfg.min_new_tokens = None
    cfg.max_length = None
    if temperature > 0:
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = True, float(temperature), float(top_p), None
    else:  # greedy; sampling settings from the model's config would only raise warnings
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
    if cfg.eos_token_id is None:
        cfg.eos_token_id = tokenizer.eos_token_id
    if cfg.pad_token_id is None:  # batch 1 never pads; set it so generate does not warn
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_id
    return cfg


def eos_ids(cfg) -> set:
    eos = cfg.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, seed: Optional[int] = None, chat: bool = False,
                  out: Optional[TextIO] = sys.stdout, input_ids: Optional[torch.Tensor] = None) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (or the given `input_ids` [1, L]) with `model.generate`,
    streaming the text to `out` as it comes (None: silent). Returns the text, token counts and timings."""
    if input_ids is None:
        input_ids = prompt_ids(tokenizer, prompt, chat)
    input_ids = input_ids.to(model.device)
    cfg = generation_config_for(model, tokenizer, max_new_tokens, temperature, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    streamer = _timed_streamer(tokenizer, out)
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
                                streamer=streamer)
    new = output[0, input_ids.shape[1]:].tolist()
    times = streamer.token_times
    start = streamer.prompt_time if streamer.prompt_time is not None else (times[0] if times else 0.0)
    prefill = times[0] - start if times else 0.0
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    stop = "eos" if new and new[-1] in eos_ids(cfg) else "length"
    return GenerationResult(text="".join(streamer.pieces), prompt_tokens=int(input_ids.shape[1]),
                            new_tokens=len(new), prefill_seconds=prefill, decode_seconds=decode, stop=stop,
                            token_ids=new)


def load_for_generation(path: str, dtype: Optional[torch.dtype] = None, device: str = "cpu"):
    """(model, tokenizer, kind) for a saliq checkpoint (kind "saliq", in its own dtype unless `dtype` is given) or
    a float model directory / .gguf file (kind "float", float32 unless `dtype` is given)."""
    from pathlib import Path

    from . import hf
    from .checkpoint import looks_like_saliq_checkpoint

    p = Path(path)
    if p.is_dir() and looks_like_saliq_checkpoint(p):
        model, tok = hf.load(p, device=device, dtype=dtype)
        return model, tok, "saliq"
    model, tok = hf.load_model(p, dtype=dtype or torch.float32, device=device)
    return model, tok, "float"


def context_length(model) -> Optional[int]:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None
