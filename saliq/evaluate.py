"""Perplexity on a text: non-overlapping windows of `seqlen` tokens, each scored on its own (no carried context),
exp of the mean next-token negative log-likelihood over all scored tokens (the GPTQ / OmniQuant protocol)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()  # not inference_mode: custom ops may update buffers in place
def perplexity(model, windows: torch.Tensor, progress: bool = False) -> dict:
    """{"perplexity", "tokens" (tokens read), "predicted" (tokens scored), "windows", "seconds"} of `model` on int64 `windows` [n, seqlen]."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    start = time.perf_counter()
    it = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", unit="window", leave=False)
    for i in it:
        x = windows[i : i + 1].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += x.shape[1] - 1
    mean = nll / count
    return {
        "perplexity": math.exp(mean) if mean < 700 else float("inf"),
        "tokens": int(windows.numel()),
        "predicted": count,
        "windows": int(windows.shape[0]),
        "seconds": time.perf_counter() - start,
    }
