"""A decode step's linears on the CPU, back to back: saliq QuantLinear layers against F.linear in fp32 and bf16.

bench_cpu_decode.py times one layer at a time after flushing the caches; a decode step instead runs the layers
of every block one after another, with the threads' team awake from the previous call and the caches full of
other layers' (clean) weights. Here: `--blocks` LLaMA-2-7B-shaped blocks (q, k, v, o 4096 x 4096; gate, up
11008 x 4096; down 4096 x 11008; together far beyond the last-level cache, so every layer comes from DRAM),
each layer called once per pass with M = 1 (its input a fixed random row: the arithmetic, not the model, is
measured), passes of the quantized stack (fp32 and bf16 activations) and of the dense fp32 and bf16 stacks
interleaved with a 256 MiB copy, round after round. Reported per thread count: the copy bandwidth of the same
rounds, each stack's milliseconds per block (median pass / blocks), the quantized stack's GB/s over every byte
it reads (packed words, scales, zeros) and its share of the copy, and its speedup over the dense stacks.

    python benchmarks/cpu_decode_blocks.py [--blocks 4] [--bits 2,3] [--threads 1,2] [--rounds 9]
        [--out FILE] [--json FILE] [--shrink 16]   # --shrink: every dimension divided (to whole groups; smoke runs)

libgomp's default waiting (OMP_WAIT_POLICY unset), as `saliq generate` runs: the point is the back-to-back rate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import random_packed, write_report_files

from saliq.nn import QuantLinear

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (N out, K in): q k v o, gate up, down


def quant_stack(shapes: list, bits: int, dtype: torch.dtype, g: torch.Generator) -> list:
    return [QuantLinear(random_packed(n, k, bits, 64, dtype, device="cpu", generator=g)).eval() for n, k in shapes]


def layer_bytes(layer: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qweight_hi, layer.scales, layer.zeros))


def passes(stacks: dict, inputs: dict, rounds: int) -> dict:
    """Median seconds of one pass over each stack (and of the copy), the stacks interleaved round by round."""
    times = {name: [] for name in stacks}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up (plans, buffers) and is dropped
            for name, stack in stacks.items():
                xs = inputs[name]
                t0 = time.perf_counter()
                for fn, x in zip(stack, xs):
                    fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shrink", type=int, default=1)
    args = ap.parse_args(argv)
    from saliq import cpp_backend as cpp

    g = torch.Generator().manual_seed(0)
    small = lambda d: max(64, d // args.shrink // 64 * 64)  # noqa: E731  (whole groups of 64)
    shapes = [(small(n), small(k)) for _ in range(args.blocks) for n, k in SHAPES]
    dense32 = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]
    dense16 = [w.bfloat16() for w in dense32]
    x32 = [torch.randn(1, k, generator=g) for _, k in shapes]
    x16 = [x.bfloat16() for x in x32]
    src = torch.ones((256 << 20) // 4)
    dst = torch.empty_like(src)
    lines = [f"Decode linears back to back, {args.blocks} LLaMA-2-7B-shaped blocks, M = 1, cpu path {cpp.cpu_isa()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average before "
             f"{os.getloadavg()[0]:.2f}", "",
             "| threads | bits | copy GB/s | saliq fp32 x ms/block (GB/s, % copy) | saliq bf16 x ms/block (% copy) | "
             "F.linear fp32 ms/block | F.linear bf16 ms/block | x fp32 | x bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    records = []
    for bits in [int(b) for b in args.bits.split(",")]:
        q32 = quant_stack(shapes, bits, torch.float32, g)
        q16 = quant_stack(shapes, bits, torch.bfloat16, g)
        b32, b16 = sum(map(layer_bytes, q32)), sum(map(layer_bytes, q16))
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            stacks = {"q32": q32, "q16": q16, "lin32": [lambda x, w=w: F.linear(x, w) for w in dense32],
                      "lin16": [lambda x, w=w: F.linear(x, w) for w in dense16], "copy": [lambda _: dst.copy_(src)]}
            inputs = {"q32": x32, "q16": x16, "lin32": x32, "lin16": x16, "copy": [None]}
            t = passes(stacks, inputs, args.rounds)
            copy_gbs = 2 * src.nbytes / t["copy"] / 1e9
            per = {k: v / args.blocks * 1e3 for k, v in t.items()}
            gbs32, gbs16 = b32 / t["q32"] / 1e9, b16 / t["q16"] / 1e9
            lines.append(f"| {threads} | {bits} | {copy_gbs:.1f} | {per['q32']:.3f} ({gbs32:.1f}, "
                         f"{100 * gbs32 / copy_gbs:.0f}%) | {per['q16']:.3f} ({100 * gbs16 / copy_gbs:.0f}%) | "
                         f"{per['lin32']:.3f} | {per['lin16']:.3f} | {t['lin32'] / t['q32']:.1f}x | "
                         f"{t['lin16'] / t['q16']:.1f}x |")
            print(lines[-1], flush=True)
            records.append(dict(threads=threads, bits=bits, copy_gbs=copy_gbs, blocks=args.blocks,
                                saliq_fp32_s=t["q32"], saliq_bf16_s=t["q16"], linear_fp32_s=t["lin32"],
                                linear_bf16_s=t["lin16"], saliq_fp32_bytes=b32, saliq_bf16_bytes=b16))
    lines.append(f"\nload average after {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    write_report_files(text, {"records": records, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}, args.out,
                       args.json)
    return {"records": records}


if __name__ == "__main__":
    main()
