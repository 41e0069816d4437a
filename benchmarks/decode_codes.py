"""The tensor-core decode kernel's two ways of feeding codes at M = 1 with fp16 x, side by side: codes 0 (a packed
fma per code pair makes exact fp16 integers; the default) and codes 1 (the codes masked in place as fp16
subnormals, no fma; exact only where the tensor cores take subnormal operands, which
benchmarks/probes/mma_subnormals.cu answers). Each is checked against ref, then graph-timed (weights rotated past
the L2) against fp16 F.linear on the LLaMA-7B shapes. `make gpu-check` runs it; its table decides the default
(csrc/cuda/decode_mma.cu, g_codes).

    python benchmarks/decode_codes.py [--out FILE.md]
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from common import copies_beyond_l2, graph_time_ms, nbytes, random_packed, rel_err
import saliq.cpp_backend as cpp
from saliq import ref

SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672)]  # [N, K]
BITS = (2, 4)  # 3-bit codes keep the packed fma (their third bit comes from another plane)


def check(codes: int) -> list[str]:
    """Failures of one code form against ref at M = 1 (whole and ragged shapes, every group size)."""
    failures = []
    gen = torch.Generator(device="cuda").manual_seed(2000 + codes)
    for bits in BITS:
        for group in (32, 64, 128, -1):
            for n, k in ((96, 1024), (37, 448)):
                g = k if group == -1 else group
                if k % g:
                    continue
                p = random_packed(n, k, bits, group, torch.float16, generator=gen)
                x = torch.randn(1, k, device="cuda", dtype=torch.float16, generator=gen)
                y = cpp.cuda_packed_matmul(x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, g, k, None)
                W = ref.dequantize(p.qweight, p.qweight_hi, p.scales.float(), p.zeros, bits, g, k)  # fp32 W
                err = rel_err(y, x.float() @ W.T)
                if not err < 1e-3:
                    failures.append(f"codes {codes} bits {bits} group {group} {n}x{k}: rel err {err:.2e}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table to this markdown file too")
    args = parser.parse_args()
    previous = cpp._C.cuda_decode_mma_set_codes(0)
    lines = []
    try:
        verdict = {}
        for codes in (0, 1):
            cpp._C.cuda_decode_mma_set_codes(codes)
            failures = check(codes)
            verdict[codes] = "correct" if not failures else "WRONG: " + "; ".join(failures[:4])
            print(f"codes {codes}: {verdict[codes]}", flush=True)
        head = "| N x K | bits | fp16 ms | codes 0 ms (x fp16) | codes 1 ms (x fp16) | codes 1 / codes 0 |"
        lines += [head, "|---|---|---|---|---|---|"]
        print(head, flush=True)
        for n, k in SHAPES:
            for bits in BITS:
                p0 = random_packed(n, k, bits, 64, torch.float16)
                args_of = [(p0.qweight, p0.qweight_hi, p0.scales, p0.zeros, bits, 64, k)]
                args_of += [(p0.qweight.clone(), p0.qweight_hi.clone(), p0.scales.clone(), p0.zeros.clone(), bits, 64,
                             k) for _ in range(copies_beyond_l2(p0.nbytes()) - 1)]
                W16 = ref.dequantize(*args_of[0]).to(torch.float16)
                w16 = [W16] + [W16.clone() for _ in range(copies_beyond_l2(nbytes(W16)) - 1)]
                x = torch.randn(1, k, device="cuda", dtype=torch.float16)
                t16 = graph_time_ms([(lambda w=w: F.linear(x, w)) for w in w16], replays=5, rounds=3)
                t = {}
                for codes in (0, 1):
                    cpp._C.cuda_decode_mma_set_codes(codes)
                    t[codes] = graph_time_ms([(lambda a=a: cpp.cuda_packed_matmul(x, *a, None)) for a in args_of],
                                             replays=5, rounds=3)
                line = (f"| {n}x{k} | {bits} | {t16:.4f} | {t[0]:.4f} ({t16 / t[0]:.2f}x) | {t[1]:.4f} "
                        f"({t16 / t[1]:.2f}x) | {t[0] / t[1]:.2f}x |")
                lines.append(line)
                print(line, flush=True)
                del args_of, w16
                torch.cuda.empty_cache()
    finally:
        cpp._C.cuda_decode_mma_set_codes(previous)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Decode kernel at M = 1, fp16 x: packed-fma codes (0) against subnormal codes (1)\n\n"
                    f"{torch.cuda.get_device_name()}; graph-timed, weights rotated past the L2; x fp16 = speedup over "
                    f"fp16 F.linear. Against ref: codes 0 {verdict[0]}; codes 1 {verdict[1]}.\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
