"""Warps-per-CTA sweep of the tensor-core decode kernel: graph-timed ms per call (weights rotated past the L2)
for each shape, bit width and M, against fp16 F.linear; prints the best warps count per case. Used to set the
launcher's heuristic (csrc/cuda/decode_mma.cu).

    python benchmarks/decode_sweep.py
"""
import sys

import torch
import torch.nn.functional as F

from common import graph_time_ms, packed_args_beyond_l2, random_packed, tensor_beyond_l2
import saliq.cpp_backend as cpp
from saliq import ref

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)]
WARPS = [0, 2, 4, 6, 8, 12, 16]


def main() -> int:
    print("| N x K | bits | M | fp16 ms | default warps | " + " | ".join(f"w{w}" for w in WARPS[1:]) + " | best |")
    print("|---|---|---|---|---|" + "---|" * len(WARPS[1:]) + "---|")
    for n, k in SHAPES:
        for bits in (2, 3, 4):
            p0 = random_packed(n, k, bits, 64, torch.float16)
            args_of = packed_args_beyond_l2(p0, bits, 64, k)
            W16 = ref.dequantize(*args_of[0]).to(torch.float16)
            w16 = tensor_beyond_l2(W16)
            for M in (1, 4, 16):
                x = torch.randn(M, k, device="cuda", dtype=torch.float16)
                t16 = graph_time_ms([(lambda w=w: F.linear(x, w)) for w in w16], replays=5, rounds=3)
                ts = []
                for w in WARPS:
                    ts.append(graph_time_ms([(lambda a=a: cpp.cuda_packed_matmul(x, *a, None, warps=w))
                                             for a in args_of], replays=5, rounds=3))
                best = min(range(1, len(WARPS)), key=lambda i: ts[i])
                dflt = cpp._C.cuda_decode_mma_warps(False, M, k, n, 64, bits)
                print(f"| {n}x{k} | {bits} | {M} | {t16:.4f} | {dflt}: {ts[0]:.4f} ({t16 / ts[0]:.2f}x) | "
                      + " | ".join(f"{t:.4f}" for t in ts[1:]) + f" | w{WARPS[best]} {t16 / ts[best]:.2f}x |",
                      flush=True)
            del args_of, w16
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
