"""Perplexity through the CPU decode path, one token at a time, for each activation setting of the packed GEMV.

`saliq eval` runs whole sequences (M > 32 rows: the prefill GEMM, which never rounds x), so it cannot show what
rounding the activations to int8 digits costs. Here the model reads `--tokens` tokens of the text one at a time
with its KV cache, so every QuantLinear runs the M = 1 GEMV, once per setting of `saliq.cpp_backend.set_cpu_gemv`
(docs/OPS.md): `exact` (fp32 products of the codes with x), `auto` (the default: three digits for fp32 x, two for
bf16), `int8x1`, `int8x2`, `int8x3`; and the same tokens as one sequence (the prefill path) for reference.
Reported per setting: perplexity, its change against `exact`, and the largest difference of any next-token
log-probability from `exact`'s.

    python benchmarks/decode_digits_ppl.py [--ckpt DIR] [--text FILE] [--tokens 512] [--dtype fp32|bf16]
    python benchmarks/decode_digits_ppl.py --smoke        # a tiny random quantized model, seconds (tests run this)

Results: benchmarks/results/<date>-cpu-decode-digits.json and .md (not written by --smoke).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ("exact", "auto", "int8x1", "int8x2", "int8x3")


def decode_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, reading one token per forward with the KV cache."""
    from transformers import DynamicCache

    out, cache = [], DynamicCache(config=model.config)
    with torch.no_grad():
        for t in range(ids.shape[1] - 1):
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            out.append(torch.log_softmax(step.logits[0, -1].float(), -1)[ids[0, t + 1]])
    return torch.stack(out)


def prefill_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


def run(model, ids: torch.Tensor) -> dict:
    from saliq import cpp_backend as cpp

    previous = cpp.cpu_gemv()
    rows, exact = {}, None
    try:
        for setting in SETTINGS:
            cpp.set_cpu_gemv(setting)
            t0 = time.perf_counter()
            lp = decode_log_probs(model, ids)
            rows[setting] = {"log_probs": lp, "seconds": time.perf_counter() - t0}
            if setting == "exact":
                exact = lp
    finally:
        cpp.set_cpu_gemv(previous)
    rows["prefill"] = {"log_probs": prefill_log_probs(model, ids), "seconds": None}
    result = {}
    for name, r in rows.items():
        lp = r["log_probs"]
        ppl = math.exp(-lp.mean().item())
        result[name] = {"perplexity": ppl, "relative_to_exact": ppl / math.exp(-exact.mean().item()) - 1.0,
                        "max_log_prob_diff": (lp - exact).abs().max().item(), "seconds": r["seconds"]}
    return result


def table(result: dict, meta: dict) -> str:
    lines = [f"Perplexity through the CPU decode path (one token at a time), {meta['ckpt']}, {meta['dtype']} "
             f"activations, {meta['tokens']} tokens of {meta['text']}, {meta['threads']} thread(s), {meta['date']}",
             "", "| setting | perplexity | vs exact | max log-prob diff | seconds |", "|---|---|---|---|---|"]
    for name, r in result.items():
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {name} | {r['perplexity']:.4f} | {100 * r['relative_to_exact']:+.4f}% | "
                     f"{r['max_log_prob_diff']:.2e} | {secs} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, default=None, help="saliq checkpoint (default: the demo's W2 g64 saliq)")
    p.add_argument("--text", type=Path, default=None, help="text (default: the testbed's alice29.txt)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the activations' (and model's) dtype")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="a tiny random quantized model, results not written")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error(f"--tokens must be at least 2, got {args.tokens}")
    if not args.smoke:
        from saliq import demo, testbed

        args.text = args.text or testbed.fetch().eval_text
        args.ckpt = args.ckpt or demo.demo_dir("saliq", 2)
        if not (args.ckpt / "config.json").is_file():
            p.error(f"--ckpt {args.ckpt} holds no checkpoint: run `make demo` first, or pass --ckpt DIR")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from quant_models import make_quant_llama  # noqa: E402

        model = make_quant_llama(bits=2, lora_rank=4).to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    else:
        from saliq import hf

        model, tok = hf.load(args.ckpt, dtype=dtype)
        text = args.text.read_text(encoding="utf-8")
        ids = tok(text[: 40 * args.tokens], return_tensors="pt")["input_ids"][:, :args.tokens]
    result = run(model.eval(), ids)
    meta = {"ckpt": "smoke" if args.smoke else str(args.ckpt.name), "text": "random ids" if args.smoke else
            args.text.name, "tokens": ids.shape[1], "dtype": args.dtype, "threads": args.threads,
            "date": datetime.date.today().isoformat()}
    text = table(result, meta)
    print(text)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"{meta['date']}-cpu-decode-digits-{args.dtype}"
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": result}, indent=1) + "\n")
    return {"meta": meta, "results": result}


if __name__ == "__main__":
    main()
