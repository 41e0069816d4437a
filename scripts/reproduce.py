#!/usr/bin/env python
"""Regenerate the README's measured tables from scratch: perplexity of every method on the testbed
(SmolLM2-135M, W2 and W3 g64) and the CPU kernel speedups, with a description of the machine.

    make reproduce                                     # full budget: about 30 minutes on a 2-core CPU
    .venv/bin/python scripts/reproduce.py --quick      # a small budget (minutes): checks the pipeline runs
    .venv/bin/python scripts/reproduce.py --no-speed   # quality only (or --no-quality)

Quality: 16 calibration windows of 256 tokens of lcet10.txt (seed 42), perplexity on the first 19,968 tokens of
alice29.txt in 512-token windows, as the README states; --quick uses 4 x 128 tokens, half the epochs (at least
one) and 2,048 evaluation tokens, so its figures are not the README's. Speed: the CPU benchmark suites with
timing on (benchmarks/bench_cpu_*.py, OMP_WAIT_POLICY=passive). Results go to --out (default
benchmarks/results): <date>-<machine>-quality.md / .json and the suites' cpu_*.md / .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (row label as in the README, CalibConfig settings; epochs are the full budget's; a {bits: value} dict is a
# per-width setting). The rows measured before fp16 scale storage keep their fp32 scales.
FP32_SCALES = dict(scale_dtype="float32")
ROWS = [
    ("fp32", None),
    ("RTN", dict(method="rtn", **FP32_SCALES)),
    ("ApiQ, `opt` 2 epochs per block", dict(method="apiq", epochs=2, **FP32_SCALES)),
    ("ApiQ, `opt` 4 epochs per block (more time than saliq's default)", dict(method="apiq", epochs=4,
                                                                              **FP32_SCALES)),
    ("ApiQ + plain squared-error clipping search, `opt` 2 (ablation)", dict(method="apiq", epochs=2,
                                                                             clip_init="search", **FP32_SCALES)),
    ("saliq default: saliency-weighted clipping search, `wpt` 2 after LoRA, `opt` 2", dict(method="saliq",
                                                                                          epochs=2, **FP32_SCALES)),
    ("saliq, LoRA r2 and a saliency-driven bit budget of 2.5 / 3.5",
     dict(method="saliq", epochs=2, lora_rank=2, bit_budget={2: 2.5, 3: 3.5})),
]
FULL = dict(nsamples=16, seqlen=256, eval_tokens=19968)
QUICK = dict(nsamples=4, seqlen=128, eval_tokens=2048)
SEED, GROUP, EVAL_SEQLEN = 42, 64, 512


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": str(datetime.date.today()),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def fmt_ppl(p: float) -> str:
    return f"{p:.2f}" if p < 1000 else f"{p:,.0f}"


def quality(bits_list, budget: dict, quick: bool) -> tuple[list[dict], dict]:
    from saliq import data, hf, testbed
    from saliq.calibrate import CalibConfig, calibrate
    from saliq.evaluate import perplexity
    from saliq.saliency import compute_saliency

    bed = testbed.fetch()
    model, tok = hf.load_model(bed.gguf)
    samples = data.load_calibration(tok, str(bed.calib_text), budget["nsamples"], budget["seqlen"], SEED)
    windows = data.load_evaluation(tok, str(bed.eval_text), EVAL_SEQLEN, budget["eval_tokens"])
    t0 = time.perf_counter()
    saliency = compute_saliency(model, samples)  # depends on the model and samples only: shared by W2 and W3
    saliency_s = time.perf_counter() - t0
    fp32 = perplexity(model, windows)["perplexity"]
    print(f"fp32: {fp32:.2f} on {windows.numel()} tokens; saliency {saliency_s:.0f} s", flush=True)
    del model
    results = []
    for label, settings in ROWS:
        for bits in bits_list:
            if settings is None:
                results.append(dict(row=label, bits=bits, perplexity=fp32, seconds=0.0))
                continue
            kw = {k: (v[bits] if isinstance(v, dict) else v) for k, v in settings.items()}
            if "epochs" in kw and quick:
                kw["epochs"] = max(1, kw["epochs"] // 2)
            cfg = CalibConfig(bits=bits, group_size=GROUP, seed=SEED, **kw)
            model, _ = hf.load_model(bed.gguf)
            res = calibrate(model, samples, cfg, saliency=saliency if cfg.uses_saliency else None, progress=False)
            ppl = perplexity(model, windows)["perplexity"]
            del model
            results.append(dict(row=label, bits=bits, perplexity=ppl, seconds=res.seconds, config=cfg.to_dict()))
            print(f"{label} W{bits}: {fmt_ppl(ppl)} ({res.seconds:.0f} s)", flush=True)
    return results, {**budget, "fp32": fp32, "saliency_seconds": saliency_s, "eval_tokens": int(windows.numel())}


def quality_table(results, bits_list) -> str:
    lines = ["| method | " + " | ".join(f"W{b}" for b in bits_list) + " |", "|---|" + "---|" * len(bits_list)]
    for label, _ in ROWS:
        cells = {r["bits"]: r for r in results if r["row"] == label}
        lines.append(f"| {label} | " + " | ".join(fmt_ppl(cells[b]["perplexity"]) for b in bits_list) + " |")
    lines += ["", "| method | " + " | ".join(f"W{b} calibration s" for b in bits_list) + " |",
              "|---|" + "---|" * len(bits_list)]
    for label, settings in ROWS[1:]:
        cells = {r["bits"]: r for r in results if r["row"] == label}
        lines.append(f"| {label} | " + " | ".join(f"{cells[b]['seconds']:.0f}" for b in bits_list) + " |")
    return "\n".join(lines)


def speed(out: Path) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="passive", SALIQ_BENCH_RESULTS=str(out))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
           "benchmarks/bench_cpu_packed_linear.py", "benchmarks/bench_cpu_fake_quant.py", "--benchmark-enable"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    pl = json.loads((out / "cpu_packed_linear.json").read_text())
    fq = json.loads((out / "cpu_fake_quant.json").read_text())
    t = {(c["provider"], c["N"], c["K"], c["bits"], c["M"]): c["seconds"] for c in pl["cases"]}
    lines = []
    for bits in (2, 3):
        s, d = t.get(("saliq_fp32", 11008, 4096, bits, 1)), t.get(("linear_fp32", 11008, 4096, bits, 1))
        if s and d:
            lines.append(f"- {bits}-bit g64 packed_linear, M = 1, 4096 -> 11008: {d / s:.1f}x fp32 F.linear "
                         f"({s * 1e3:.3f} ms against {d * 1e3:.3f} ms; {pl['threads']} threads, {pl['cpu_path']})")
    for c in fq["cases"]:
        lines.append(f"- fake quant forward + backward {c['N']}x{c['K']} W{c['bits']} g{c['group']}"
                     f"{' with saliency' if c['saliency'] else ''}: {c['eager_s'] / c['saliq_s']:.1f}x the eager "
                     f"composite ({c['saliq_s'] * 1e3:.1f} ms against {c['eager_s'] * 1e3:.1f} ms)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budget: checks the pipeline, not the README figures")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    head = (f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch "
            f"{info['torch']}, {info['date']}, load average {info['load_average']:.1f} at the start")
    print(head, flush=True)
    report = [head]
    if not args.no_quality:
        budget = QUICK if args.quick else FULL
        results, meta = quality(args.bits, budget, args.quick)
        table = quality_table(results, args.bits)
        title = (f"Quality, SmolLM2-135M g{GROUP}, {meta['nsamples']} x {meta['seqlen']} calibration tokens, "
                 f"perplexity on the first {meta['eval_tokens']} tokens of alice29.txt"
                 + (" (--quick budget: not the README's figures)" if args.quick else ""))
        report += ["", title, "", table]
        cpu = re.sub(r"[^A-Za-z0-9]+", "-", info["cpu"]).strip("-").lower()
        stem = args.out / f"{info['date']}-{cpu}-quality{'-quick' if args.quick else ''}"
        stem.with_suffix(".json").write_text(json.dumps({"machine": info, "meta": meta, "rows": results}, indent=1))
        stem.with_suffix(".md").write_text("\n".join([head, "", title, "", table]) + "\n")
    if not args.no_speed:
        report += ["", "CPU kernels (same-run ratios):", speed(args.out)]
    print("\n" + "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
