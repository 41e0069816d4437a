"""A model card (README.md with Hugging Face metadata) for a saliq checkpoint: its quantization settings and size,
an evaluation table from lm-eval results files (`saliq eval --tasks ... --output`) and perplexity results
(`saliq eval --text ... --json`), how to load it, and the versions that produced the figures.

The card is written next to the checkpoint's files as README.md, which the manifest does not list: the loader
ignores it, `saliq info` reports it, and a later save of the checkpoint keeps it."""
from __future__ import annotations

import json
import os
from pathlib import Path

CARD_NAME = "README.md"


def read_results(paths) -> tuple[list[dict], list[dict]]:
    """(task rows, perplexity rows) from results files: lm-eval's JSON (with "results") or one `--json` line of
    `saliq eval --text` (with "perplexity"); anything else is refused naming the file."""
    tasks, ppl = [], []
    for path in paths:
        text = Path(path).read_text()
        try:
            obj = json.loads(text)
        except ValueError:
            try:  # captured stdout of `saliq eval --json`: the result is its last line
                obj = json.loads(text.strip().splitlines()[-1])
            except (ValueError, IndexError) as e:
                raise ValueError(f"--results {str(path)!r} is not JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("results"), dict) and "configs" in obj:
            shots = obj.get("n-shot", {})
            for task, metrics in sorted(obj["results"].items()):
                for key, value in sorted(metrics.items()):
                    if not isinstance(value, (int, float)) or "stderr" in key or key == "alias":
                        continue
                    name, _, filt = key.partition(",")
                    tasks.append({"task": task, "metric": name, "value": value, "filter": filt,
                                  "stderr": metrics.get(f"{name}_stderr,{filt}"), "n_shot": shots.get(task),
                                  "limit": (obj.get("saliq") or {}).get("limit") or obj.get("config", {}).get("limit")})
        elif isinstance(obj, dict) and "perplexity" in obj:
            prov = obj.get("provenance") or {}
            ppl.append({"text": prov.get("text", "?"), "text_sha256": prov.get("text_sha256"),
                        "seqlen": prov.get("seqlen"), "tokens": obj.get("tokens"), "perplexity": obj["perplexity"]})
        else:
            raise ValueError(f"--results {str(path)!r} is neither lm-eval results JSON nor `saliq eval --json` "
                             "perplexity output")
    return tasks, ppl


def card_text(ckpt_dir, results=()) -> str:
    from .checkpoint import describe
    from .provenance import versions

    info = describe(ckpt_dir)
    qc = info["quantization_config"]
    name = Path(os.path.abspath(ckpt_dir)).name
    tasks, ppl = read_results(results)
    tags = ["saliq", "quantized", f"{qc['bits']}-bit", qc.get("method", "unknown")]
    widths = ", ".join(f"{n} at {b} bits" for b, n in sorted(info["layers_by_bits"].items()))
    lines = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {name}", "",
             f"A {qc['bits']}-bit ({'symmetric' if qc['symmetric'] else 'asymmetric'}, group size "
             f"{qc['group_size']}) quantization by saliq, method `{qc.get('method')}`"
             + (f", LoRA rank {qc['lora_rank']} (alpha {qc['lora_alpha']}) calibrated with the weights"
                if qc.get("lora_rank") else "") + ".", "",
             "| | |", "|---|---|",
             f"| quantized layers | {info['quantized_layers']} ({info['quantized_weights']:,} weights) |",
             f"| packed weights | {info['packed_bits_per_weight']:.3f} bits per weight with scales and zero points |",
             f"| everything counted | {info['bits_per_weight']:.3f} bits per quantized weight (codes, scales, zeros, "
             "reserved weights, LoRA) |",
             f"| layers by width | {widths} |",
             f"| checkpoint size | {info['bytes'] / 2**20:.1f} MiB |",
             f"| checkpoint format | saliq {qc['format_version']} |", ""]
    calib = qc.get("calibration_data")
    if isinstance(calib, dict) and calib.get("source"):
        lines += [f"Calibration: {calib.get('nsamples')} windows of {calib.get('seqlen')} tokens of "
                  f"`{Path(str(calib['source'])).name}`.", ""]
    lines += ["## Evaluation", ""]
    if not tasks and not ppl:
        lines += ["Not evaluated yet: `saliq eval CKPT --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande "
                  "--output results.json`, then `saliq card CKPT --results results.json`.", ""]
    if tasks:
        lines += ["| task | metric | value | stderr | n-shot | limit |", "|---|---|---|---|---|---|"]
        for r in tasks:
            err = f"{r['stderr']:.4f}" if isinstance(r["stderr"], (int, float)) else ""
            lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {err} | "
                         f"{'' if r['n_shot'] is None else r['n_shot']} | {r['limit'] or ''} |")
        lines.append("")
    if ppl:
        lines += ["| text | sha256 | window | tokens | perplexity |", "|---|---|---|---|---|"]
        for r in ppl:
            lines.append(f"| {Path(str(r['text'])).name} | {(r['text_sha256'] or '')[:12]} | {r['seqlen']} | "
                         f"{r['tokens']} | {r['perplexity']:.3f} |")
        lines.append("")
    lines += ["## Use", "", "```python", "import saliq  # registers the quantization method with transformers",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
              "Without saliq installed and imported, transformers refuses to load this checkpoint.", "",
              "Written by: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    return "\n".join(lines)


def write_card(ckpt_dir, results=(), out=None) -> Path:
    out = Path(out) if out is not None else Path(ckpt_dir) / CARD_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(card_text(ckpt_dir, results))
    os.replace(tmp, out)
    return out
