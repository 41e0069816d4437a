"""Two builds of saliq's CPU packed_matmul (the GEMV at M = 1 unless --m; M above 32 takes the prefill tiles) side
by side, caches flushed before every call: the A/B test for a kernel change on a machine whose timings drift (on a
shared 2-core VM they move by 20-30% from minute to minute, so only builds measured alternately, round after
round, compare).

Each round runs one short process per build (`--child`), alternately; a process times `--calls` calls per
case, each after streaming twice the CPU's largest cache, at least 64 MiB (the weights come from DRAM, as in a
decode step), and prints the median per case. Reported per case: the median over rounds of each build's
median, its range, and the ratio.

    git worktree add /tmp/before <rev> && (cd /tmp/before && python setup.py -q build_ext --inplace)
    python benchmarks/decode_ab.py /tmp/before . [--rounds 4] [--threads 2] [--dtype float32] [--isa avx2]
        [--shapes 11008x4096,4096x11008] [--bits 2,3] [--m 1] [--words layer|v1] [--lora RANK] [--out FILE]

--words layer (the default) times each build on the words as its QuantLinear keeps them on the CPU: the CPU word
order (saliq/word_order.py) where the build has it, format v1 in a build from before it. --lora RANK times
packed_linear, QuantLinear's forward with LoRA factors of that rank, in place of packed_matmul.

On a VM even the file a build is loaded from moves multi-threaded timings: two directories holding byte-identical
_C binaries measured 0.33 and 0.42 ms (medians) on 2 threads, each steadily (docs/NOTES.md). Compare builds as
several fresh copies of each tree's saliq/ (a tree is any directory holding one), not one of each.

Two code paths of one build: the same tree twice, `--isa` for the first and `--isa-after` for the second
(`python benchmarks/decode_ab.py . . --isa avx2 --isa-after avx2vnni`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    """Times this process's saliq (the build found first on sys.path); prints {case: median seconds} as JSON."""
    import torch

    from common import cpu_cache_flush_bytes, random_packed
    from saliq import cpp_backend as cpp

    torch.set_num_threads(args.threads)
    if args.isa:
        cpp.set_cpu_isa(args.isa)
    dtype = getattr(torch, args.dtype)
    flush = torch.ones(cpu_cache_flush_bytes() // 4)
    out = {}
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for bits in (int(b) for b in args.bits.split(",")):
            gen = torch.Generator().manual_seed(n + k + bits)  # both builds time the same weights
            p = random_packed(n, k, bits, 64, dtype, device="cpu", generator=gen)
            x = torch.randn(args.m, k, generator=gen).to(dtype)
            qw, qh = words_as(args.words, p)

            if args.lora:  # QuantLinear's forward with its LoRA factors (rank args.lora), in x's dtype
                a = (torch.randn(args.lora, k, generator=gen) * 0.02).to(dtype)
                b = (torch.randn(n, args.lora, generator=gen) * 0.02).to(dtype)

                def call():
                    return cpp.packed_linear(x, qw, qh, p.scales, p.zeros, bits, 64, k, None, a, b, 0.25)
            else:
                def call():
                    return cpp.packed_matmul(x, qw, qh, p.scales, p.zeros, bits, 64, k, None)

            call()
            times = []
            for _ in range(args.calls):
                flush.add_(1.0)
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            out[f"{shape} {bits}-bit"] = statistics.median(times)
    print(json.dumps(out))


def words_as(words: str, p):
    """The packed words as the build's QuantLinear keeps them on the CPU ("layer": the CPU word order in a build that
    has it, saliq/word_order.py; format v1 in one from before it) or in format v1 ("v1")."""
    if words == "layer":
        try:
            from saliq import word_order
        except ImportError:
            return p.qweight, p.qweight_hi
        return word_order.to_cpu_order(p.qweight, p.qweight_hi, p.bits)
    return p.qweight, p.qweight_hi


def run_build(tree: Path, args, isa: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--dtype", args.dtype,
           "--m", str(args.m), "--shapes", args.shapes, "--bits", args.bits, "--calls", str(args.calls),
           "--words", args.words, "--lora", str(args.lora)]
    cmd += ["--isa", isa] if isa else []
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", nargs="?", type=Path)
    ap.add_argument("after", nargs="?", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--isa", default="", help="cap the CPU path (saliq.cpp_backend.set_cpu_isa)")
    ap.add_argument("--words", default="layer", choices=["layer", "v1"],
                    help="the order of the packed words: as the build's QuantLinear keeps them on the CPU, or format v1")
    ap.add_argument("--isa-after", default=None, help="the second tree's cap, when not --isa")
    ap.add_argument("--shapes", default="11008x4096,4096x11008")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--m", type=int, default=1, help="rows of x (batched decode)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank: time packed_linear with LoRA factors of this rank")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.before is None or args.after is None:
        ap.error("give the two source trees (each with saliq._C built in place)")
    isa_after = args.isa if args.isa_after is None else args.isa_after
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, tree, isa in (("before", args.before, args.isa), ("after", args.after, isa_after)):
            runs[name].append(run_build(tree.resolve(), args, isa))
    paths = args.isa or "auto"
    if isa_after != args.isa:
        paths = f"{paths} (before) / {isa_after or 'auto'} (after)"
    words = "as each build's QuantLinear keeps them" if args.words == "layer" else "format v1"
    op = f"packed_linear (LoRA rank {args.lora})" if args.lora else "packed_matmul"
    head = (f"M = {args.m} {op}, {args.dtype} x, {args.threads} thread(s), cpu path {paths}, words "
            f"{words}, caches flushed, {args.rounds} rounds alternated, median of {args.calls} calls per process")
    lines = [head, "", "| case | before ms (range) | after ms (range) | before / after |", "|---|---|---|---|"]
    for case in runs["before"][0]:
        b = [r[case] * 1e3 for r in runs["before"]]
        a = [r[case] * 1e3 for r in runs["after"]]
        mb, ma = statistics.median(b), statistics.median(a)
        lines.append(f"| {case} | {mb:.3f} ({min(b):.3f}-{max(b):.3f}) | {ma:.3f} ({min(a):.3f}-{max(a):.3f}) "
                     f"| {mb / ma:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
