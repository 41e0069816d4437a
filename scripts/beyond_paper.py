#!/usr/bin/env python
"""The ablation of docs/NOTES.md "Beyond the paper": saliq's options alone and combined on the testbed at W2 and
W3 g64, at the demo's budget (16 x 256 calibration tokens of lcet10.txt, seed 42, 2 epochs per block),
perplexity on the first 19,968 tokens of alice29.txt, calibration seconds and bits per weight with everything
counted (codes, fp16 scales, int8 zeros, reserved weights, 16-bit LoRA).

    .venv/bin/python scripts/beyond_paper.py --rows w2-base w2-reserve     # some rows
    .venv/bin/python scripts/beyond_paper.py --list                        # the rows
    .venv/bin/python scripts/beyond_paper.py --rows w2-r2-budget --seed 7  # another seed
Results are appended as JSON lines to --out (default benchmarks/results/beyond-paper.jsonl); the saliency of
the testbed is computed once and cached in saliq's cache directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE = dict(method="saliq", epochs=2, group_size=64, seed=42)
# row -> CalibConfig settings beyond BASE
ROWS = {
    "w2-default": dict(bits=2),
    "w2-r8": dict(bits=2, lora_rank=8),
    "w2-no-lora": dict(bits=2, lora_rank=0),
    "w2-in-grid": dict(bits=2, lora_in_grid=True),
    "w2-in-grid-lr": dict(bits=2, lora_in_grid=True, lr_lora=5e-3),
    "w2-reserve": dict(bits=2, reserve_fraction=0.005),
    "w2-reserve-magnitude": dict(bits=2, reserve_fraction=0.005, reserve_score="magnitude"),
    "w2-budget": dict(bits=2, bit_budget=2.5),
    "w2-sw": dict(bits=2, sw_weight=1.0),
    # combinations at <= 3.0 bits per weight, everything counted
    "w2-grid-budget": dict(bits=2, lora_in_grid=True, bit_budget=2.6),
    "w2-grid-reserve-budget": dict(bits=2, lora_in_grid=True, reserve_fraction=0.005, bit_budget=2.4),
    "w2-r8-budget": dict(bits=2, lora_rank=8, bit_budget=2.25),
    "w2-r4-budget": dict(bits=2, lora_rank=4, bit_budget=2.4),
    "w2-r2-budget": dict(bits=2, lora_rank=2, bit_budget=2.5),
    "w2-r2-budget24": dict(bits=2, lora_rank=2, bit_budget=2.4),
    "w2-r1-budget245": dict(bits=2, lora_rank=1, bit_budget=2.45),
    "w2-r0-budget": dict(bits=2, lora_rank=0, bit_budget=2.5),
    "w2-r2-reserve-budget": dict(bits=2, lora_rank=2, reserve_fraction=0.0025, bit_budget=2.4),
    "w3-default": dict(bits=3),
    "w3-in-grid": dict(bits=3, lora_in_grid=True),
    "w3-reserve": dict(bits=3, reserve_fraction=0.005),
    "w3-budget": dict(bits=3, bit_budget=3.5),
    "w3-sw": dict(bits=3, sw_weight=1.0),
    # combinations at <= 4.0 bits per weight
    "w3-grid-budget": dict(bits=3, lora_in_grid=True, bit_budget=3.6),
    "w3-grid-reserve-budget": dict(bits=3, lora_in_grid=True, reserve_fraction=0.005, bit_budget=3.4),
    "w3-r8": dict(bits=3, lora_rank=8),
    "w3-r2-budget": dict(bits=3, lora_rank=2, bit_budget=3.5),
}
NSAMPLES, SEQLEN, EVAL_SEQLEN, EVAL_TOKENS = 16, 256, 512, 19968


def run_row(name: str, settings: dict, eval_tokens: int, seed: int = 42) -> dict:
    import torch

    from saliq import data, hf, testbed
    from saliq import saliency as sal_mod
    from saliq.calibrate import CalibConfig, calibrate
    from saliq.evaluate import perplexity
    from saliq.nn import QuantLinear
    from saliq.serialize import unique_state_dict
    from saliq.storage import bits_report, round_model_to, stored_state

    torch.manual_seed(0)
    bed = testbed.fetch(verbose=False)
    model, tok = hf.load_model(bed.gguf)
    samples = data.load_calibration(tok, str(bed.calib_text), NSAMPLES, SEQLEN, seed)
    windows = data.load_evaluation(tok, str(bed.eval_text), EVAL_SEQLEN, eval_tokens)
    cfg = CalibConfig(**{**BASE, "seed": seed, **settings})
    sal = None
    if cfg.uses_saliency:  # of the testbed and these samples
        path = testbed.cache_dir() / ("beyond-paper-saliency.safetensors" if seed == 42 else
                                      f"beyond-paper-saliency-seed{seed}.safetensors")
        if path.is_file():
            sal = sal_mod.load_saliency(path, model)
        else:
            sal = sal_mod.compute_saliency(model, samples, progress=False)
            sal_mod.save_saliency(sal, path)
    res = calibrate(model, samples, cfg, saliency=sal, progress=False)
    stored = stored_state(unique_state_dict(model))
    round_model_to(model, stored)  # evaluate what a checkpoint holds
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    bits = bits_report(qmods, stored)
    ev = perplexity(model, windows)
    return {"row": name, "settings": settings, "seed": seed, "perplexity": round(ev["perplexity"], 3),
            "calibration_seconds": round(res.seconds, 1), "bits_per_weight": round(bits["bits_per_weight"], 4),
            "bits": {k: round(v, 4) for k, v in bits.items() if k.endswith("_bits")},
            "eval_tokens": int(windows.numel()), "load_average": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "beyond-paper.jsonl"))
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    ap.add_argument("--seed", type=int, default=BASE["seed"],
                    help="calibration samples and initialisation (default 42, the seed of the documented rows)")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in ROWS.items():
            print(f"{k:<24} {v}")
        return 0
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; allowed: {list(ROWS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        t0 = time.perf_counter()
        rec = run_row(name, ROWS[name], args.eval_tokens, args.seed)
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
