"""End-to-end generation on the CPU: the demo's saliq checkpoint against the float testbed in fp32 and bf16.

What is measured, per model, in one process with the models interleaved round by round (so that a busy machine
slows all of them alike, and every ratio compares measurements taken side by side):
- decode tokens/s: transformers' own `model.generate`, greedy, batch 1, `--new-tokens` (64) new tokens after
  `--prompt-tokens` (8) tokens of alice29.txt, under `torch.no_grad()`; the time from the first new token to the
  last, divided by the new tokens after the first (a streamer notes when each token is chosen);
- for the saliq checkpoint also through `saliq.generate.generate_text`, the code behind `saliq generate` (its text
  streamer decoding every token included);
- prefill tokens/s: the time to the first new token after a `--prefill-tokens` (128) token prompt;
- peak memory: the peak resident set size of a fresh process that loads the model and generates once
  (`--memory-of`, run once per model after the timing rounds), next to the bytes of the model's tensors.
Each figure is the median over `--rounds`; the ratios are medians of the per-round ratios.

    python benchmarks/generate_cpu.py                     # testbed fp32 / bf16 vs <cache>/demo/saliq-w2g64
    python benchmarks/generate_cpu.py --ckpt DIR --rounds 7 --threads 2
    python benchmarks/generate_cpu.py --smoke             # tiny random models, seconds (tests run this)

Results: benchmarks/results/<date>-cpu-generate.json and .md (with the machine, the thread count and the load
average before and after, which matters on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- timing
class _Clock:
    """A generate streamer that only notes when the prompt and each new token arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy `model.generate` of exactly `new_tokens` tokens."""
    clock = _Clock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=model.generation_config.eos_token_id, streamer=clock)
    t = clock.times  # [prompt, token 1, ..., token n]
    return t[1] - t[0], t[-1] - t[1]


def time_saliq_generate(model, tok, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(prefill s, decode s, tokens) of `saliq generate`'s code path; it stops early only at an end-of-sequence
    token, so the rate uses the tokens it produced."""
    from saliq.generate import generate_text

    res = generate_text(model, tok, "", max_new_tokens=new_tokens, input_ids=ids, out=None)
    return res.prefill_seconds, res.decode_seconds, res.new_tokens


# ---------------------------------------------------------------- models
def load(kind: str, args):
    """(model, tokenizer) for kind fp32 / bf16 (the float testbed) or saliq (the checkpoint)."""
    from saliq import hf

    if kind == "saliq":
        return hf.load(args.ckpt)
    return hf.load_model(args.model, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def prompt_of(tok, text_path: Optional[Path], n: int, vocab: int) -> torch.Tensor:
    """The first n tokens of the text (random ids when there is no text: smoke runs)."""
    if text_path is None:
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    ids = tok(text_path.read_text(encoding="utf-8")[: 40 * n], return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"{text_path} gives only {ids.shape[1]} tokens; need {n}")
    return ids


def memory_of(kind: str, args) -> dict:
    """Run in a fresh process (--memory-of): load, generate once, report the peak resident set size."""
    torch.set_num_threads(args.threads)
    model, tok = load(kind, args)
    ids = prompt_of(tok, args.text, args.prompt_tokens, model.config.vocab_size)
    time_generate(model, ids, args.new_tokens)
    return {"peak_rss_bytes": peak_rss(), "tensor_bytes": tensor_bytes(model)}


def peak_rss() -> int:
    """This process's peak resident set size: VmHWM (ru_maxrss would include the parent's peak, which a child
    inherits across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- machine
def machine() -> dict:
    info = {"os": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags"))
        info["simd"] = [f for f in ("avx", "fma", "f16c", "avx2", "avx_vnni", "avx512f", "avx512_bf16", "avx512_vnni")
                        if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        from saliq import cpp_backend

        info["saliq_cpu_path"] = cpp_backend.cpu_isa()
    except ImportError:
        info["saliq_cpu_path"] = "saliq._C not built"
    return info


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------- the run
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    kinds = ["fp32", "bf16", "saliq"]
    models, toks = {}, {}
    for kind in kinds:
        t0 = time.perf_counter()
        models[kind], toks[kind] = load(kind, args) if not args.smoke else smoke_model(kind)
        _say(f"{kind}: loaded in {time.perf_counter() - t0:.1f} s")
    tok = toks["saliq"] or toks["fp32"]
    vocab = models["fp32"].config.vocab_size
    decode_ids = prompt_of(tok, args.text, args.prompt_tokens, vocab)
    prefill_ids = prompt_of(tok, args.text, args.prefill_tokens, vocab)
    rows = {k: {"decode": [], "prefill": []} for k in kinds}
    rows["saliq generate"] = {"decode": [], "prefill": []}
    for kind in kinds:  # warm-up: first calls allocate caches and pick kernels
        time_generate(models[kind], decode_ids, 4)
    load_before = load_average()
    for r in range(args.rounds):
        for kind in kinds:
            pre, dec = time_generate(models[kind], decode_ids, args.new_tokens)
            rows[kind]["decode"].append((args.new_tokens - 1) / dec)
            pre, _ = time_generate(models[kind], prefill_ids, 1)
            rows[kind]["prefill"].append(prefill_ids.shape[1] / pre)
        if toks["saliq"] is not None:
            pre, dec, n = time_saliq_generate(models["saliq"], toks["saliq"], decode_ids, args.new_tokens)
            rows["saliq generate"]["decode"].append((n - 1) / dec if n > 1 else float("nan"))
        line = ", ".join(f"{k} {v['decode'][-1]:.1f}" for k, v in rows.items() if v["decode"])
        _say(f"round {r + 1}/{args.rounds}: decode tokens/s {line}")
    load_after = load_average()

    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_average_before": load_before,
              "load_average_after": load_after, "settings": settings_of(args),
              "models": {}, "ratios": {}}
    for kind, v in rows.items():
        if not v["decode"]:
            continue
        entry = {"decode_tokens_per_s": statistics.median(v["decode"]), "decode_samples": v["decode"]}
        if v["prefill"]:
            entry.update(prefill_tokens_per_s=statistics.median(v["prefill"]), prefill_samples=v["prefill"])
        result["models"][kind] = entry
    for num in ("saliq", "saliq generate"):
        for den in ("fp32", "bf16"):
            if rows[num]["decode"]:
                per_round = [a / b for a, b in zip(rows[num]["decode"], rows[den]["decode"])]
                result["ratios"][f"{num} / {den} decode"] = statistics.median(per_round)
    if args.memory:
        for kind in kinds:
            result["models"][kind].update(measure_memory(kind, args))
    return result


def settings_of(args) -> dict:
    """The run's settings, files by name only (results are shared; where they lay on this machine is not)."""
    out = {}
    for k, v in vars(args).items():
        if k in ("out", "memory_of"):
            continue
        out[k] = v.name if isinstance(v, Path) else v
    return out


def measure_memory(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", kind, "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    if args.smoke:
        cmd.append("--smoke")
    else:
        cmd += ["--model", str(args.model), "--ckpt", str(args.ckpt), "--text", str(args.text)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def smoke_model(kind: str):
    """Tiny random models of the tests' fixture for a --smoke run: a float Llama and the same one quantized."""
    sys.path.insert(0, str(ROOT / "tests"))
    from quant_models import make_quant_llama  # noqa: E402
    from fixtures_llama import make_byte_tokenizer, make_tiny_llama  # noqa: E402

    tok = make_byte_tokenizer()
    if kind == "saliq":
        return make_quant_llama(bits=2, lora_rank=4), tok
    model = make_tiny_llama()
    return (model if kind == "fp32" else model.to(torch.bfloat16)), tok


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['date']}-cpu-generate"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# Generation on the CPU, {result['date']}",
        "",
        f"{m.get('cpu', platform.processor())}, {m['cpus']} cores (SIMD: {', '.join(m.get('simd', []))}; saliq "
        f"path {m['saliq_cpu_path']}), {m['threads']} threads, torch {m['torch']}, transformers "
        f"{m.get('transformers', '?')}; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after.",
        f"transformers `generate`, greedy, batch 1, {s['new_tokens']} new tokens after {s['prompt_tokens']}, "
        f"`torch.no_grad()`; prefill: time to the first token after {s['prefill_tokens']} prompt tokens. Medians of "
        f"{s['rounds']} rounds, models interleaved.",
        "",
        "| model | decode tokens/s | prefill tokens/s | peak RSS | tensors |",
        "|---|---|---|---|---|",
    ]
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    for kind, e in result["models"].items():
        lines.append(f"| {kind} | {e['decode_tokens_per_s']:.1f} | "
                     f"{cell(e.get('prefill_tokens_per_s'), '{:.1f}')} | "
                     f"{cell(_mib(e.get('peak_rss_bytes')), '{:.0f} MiB')} | "
                     f"{cell(_mib(e.get('tensor_bytes')), '{:.0f} MiB')} |")
    lines += ["", "| ratio (median of per-round ratios) | |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def _mib(n):
    return None if n is None else n / 2**20


def _say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    from saliq import demo, testbed

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="float testbed (default: the cached GGUF)")
    p.add_argument("--ckpt", type=Path, default=None, help="saliq checkpoint (default: the demo's W2 g64 saliq)")
    p.add_argument("--text", type=Path, default=None, help="prompt text (default: the testbed's alice29.txt)")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny random models, no testbed, results not written")
    p.add_argument("--memory-of", default=None, choices=("fp32", "bf16", "saliq"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.smoke:
        bed = testbed.fetch()
        args.model = args.model or bed.gguf
        args.text = args.text or bed.eval_text
        args.ckpt = args.ckpt or demo.demo_dir("saliq", 2)
        if not (args.ckpt / "config.json").is_file():
            p.error(f"--ckpt {args.ckpt} holds no checkpoint: run `saliq demo` (or `make demo`) first, or pass "
                    "--ckpt DIR")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args) if not args.smoke else smoke_memory(args)))
        return {}
    result = run(args)
    if not args.smoke:
        paths = write_results(result, args.out)
        _say(f"wrote {paths[0]} and {paths[1]}")
    for k, v in result["ratios"].items():
        _say(f"{k}: {v:.2f}x")
    return result


def smoke_memory(args) -> dict:
    model, _ = smoke_model(args.memory_of)
    time_generate(model, prompt_of(None, None, args.prompt_tokens, model.config.vocab_size), args.new_tokens)
    return {"peak_rss_bytes": peak_rss(), "tensor_bytes": tensor_bytes(model)}


if __name__ == "__main__":
    main()
