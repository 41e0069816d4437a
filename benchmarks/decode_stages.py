"""The tensor-core decode kernel's loops side by side: the register loop (stages 0) against the cp.async ring of
3, 4 or 6 slots, each checked against ref on fresh random inputs (every group size, fp16 and bf16, M = 1..16),
then graph-timed (weights rotated past the L2) at several warps per CTA against fp16 F.linear. Used to pick the
ring depth and to check the warps rule for it (csrc/cuda/decode_mma.cuh).

    python benchmarks/decode_stages.py [--out FILE.md]
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from common import copies_beyond_l2, graph_time_ms, nbytes, random_packed, rel_err
import saliq.cpp_backend as cpp
from saliq import ref

STAGES = [0, 3, 4, 6]
SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672)]  # [N, K]
WARPS = [0, 8, 16]


def check(stages: int) -> list[str]:
    """Failures of one loop against ref (whole shapes: the path the ring serves)."""
    failures = []
    gen = torch.Generator(device="cuda").manual_seed(1000 + stages)
    for bits in (2, 3, 4):
        for group in (32, 64, 128, -1):
            for dtype in (torch.float16, torch.bfloat16):
                for M in (1, 5, 16):
                    n, k = 96, 1024
                    p = random_packed(n, k, bits, group, dtype, generator=gen)
                    g = k if group == -1 else group
                    x = torch.randn(M, k, device="cuda", dtype=dtype, generator=gen)
                    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
                    y = cpp.cuda_packed_matmul(x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, g, k, bias)
                    W = ref.dequantize(p.qweight, p.qweight_hi, p.scales.float(), p.zeros, bits, g, k)  # fp32 W
                    expected = x.float() @ W.T + bias.float()
                    err = rel_err(y, expected)
                    if not err < (4e-3 if dtype == torch.bfloat16 else 1e-3):
                        failures.append(f"stages {stages} bits {bits} group {group} {dtype} M {M}: rel err {err:.2e}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table to this markdown file too")
    args = parser.parse_args()
    previous = cpp._C.cuda_decode_mma_set_stages(0)
    lines = []
    try:
        head = "| N x K | bits | M | fp16 ms | " + " | ".join(f"s{s}" for s in STAGES) + " | best |"
        lines += [head, "|---|---|---|---|" + "---|" * len(STAGES) + "---|"]
        print(head.replace("|---", ""), flush=True)
        for n, k in SHAPES:
            for bits in (2, 3, 4):
                p0 = random_packed(n, k, bits, 64, torch.float16)
                args_of = [(p0.qweight, p0.qweight_hi, p0.scales, p0.zeros, bits, 64, k)]
                args_of += [(p0.qweight.clone(), p0.qweight_hi.clone(), p0.scales.clone(), p0.zeros.clone(), bits, 64,
                             k) for _ in range(copies_beyond_l2(p0.nbytes()) - 1)]
                W16 = ref.dequantize(*args_of[0]).to(torch.float16)
                w16 = [W16] + [W16.clone() for _ in range(copies_beyond_l2(nbytes(W16)) - 1)]
                for M in (1, 16):
                    x = torch.randn(M, k, device="cuda", dtype=torch.float16)
                    t16 = graph_time_ms([(lambda w=w: F.linear(x, w)) for w in w16], replays=5, rounds=3)
                    cells, best = [], (0.0, "")
                    for stages in STAGES:
                        cpp._C.cuda_decode_mma_set_stages(stages)
                        dflt = cpp._C.cuda_decode_mma_warps(False, M, k, n, 64, bits)
                        ts = {}
                        for w in WARPS:
                            ts[w] = graph_time_ms([(lambda a=a: cpp.cuda_packed_matmul(x, *a, None, warps=w))
                                                   for a in args_of], replays=5, rounds=3)
                        wbest = min(ts, key=ts.get)
                        cells.append(f"{t16 / ts[0]:.2f}x (w{dflt}); w{wbest or dflt} {t16 / ts[wbest]:.2f}x")
                        if t16 / ts[wbest] > best[0]:
                            best = (t16 / ts[wbest], f"s{stages} w{wbest or dflt}")
                    line = (f"| {n}x{k} | {bits} | {M} | {t16:.4f} | " + " | ".join(cells)
                            + f" | {best[1]} {best[0]:.2f}x |")
                    lines.append(line)
                    print(line, flush=True)
                del args_of, w16
                torch.cuda.empty_cache()
        for stages in STAGES:  # after the timings: tests/test_cuda_gpu.py checks the loops too
            cpp._C.cuda_decode_mma_set_stages(stages)
            failures = check(stages)
            print(f"stages {stages}: {'correct' if not failures else 'WRONG'}", flush=True)
            for f in failures[:10]:
                print("  ", f, flush=True)
    finally:
        cpp._C.cuda_decode_mma_set_stages(previous)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Decode kernel loops: register loop (s0) against the cp.async ring (s3, s4, s6)\n\n"
                    f"{torch.cuda.get_device_name()}; x fp16 = speedup over fp16 F.linear, graph-timed, weights "
                    "rotated past the L2; each cell: the launcher's warps, then the best of " + str(WARPS[1:]) + "\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
