"""Throughput of a mix of AVX-512 instructions on this core: cycles per iteration of a loop of independent zmm
instructions (inline asm, compiled with g++ and run here). It answers what the int8 GEMV's inner loop can cost
beside its dot products: a mix of 12 `vpdpbusd` (the three-digit dot products of a word row of 16 columns) with
the shifts, selects and masks that make the codes (docs/NOTES.md, "Where Zen 4's cycles go").

    python benchmarks/cpu_instruction_mix.py                      # the standard mixes
    python benchmarks/cpu_instruction_mix.py dpbusd=12 shift=6 ternlog=4 and=4

Kinds: dpbusd (12 accumulators), shift (vpsrld), ternlog (vpternlogd), and (vpandd), affine (vgf2p8affineqb),
multishift (vpmultishiftqb), shufbit (vpshufbitqmb into a mask), maskadd (vpaddb under a mask), move (vmovdqa32
register copies), broadcast (vpbroadcastd from memory), load (vmovdqu32), permb (vpermb); and the prefill
dequantizer's (`packed_prefill_avx512.cpp`): varshift (vpsrlvd), permps (vpermps), mulps (vmulps), cvtbf16
(vcvtne2ps2bf16), store (vmovdqu32 to memory). Each kind writes its own registers, so no instruction waits for
another; the clock is measured as `cpu_gemv_cycles.cpp` does (`cpu_clock.h`). A mix whose
instructions the CPU lacks is named and skipped.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent  # cpu_clock.h

# kind -> (asm template of instruction i, registers it may write); sources are zmm0-3
KINDS = {
    "dpbusd": lambda i: f"vpdpbusd %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{10 + i % 12}",
    "shift": lambda i: f"vpsrld ${1 + i % 3}, %%zmm{i % 4}, %%zmm{22 + i % 4}",
    "ternlog": lambda i: f"vpternlogd $0xe4, %%zmm{i % 4}, %%zmm{(i + 2) % 4}, %%zmm{26 + i % 3}",
    "and": lambda i: f"vpandd %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{29 + i % 3}",
    "affine": lambda i: f"vgf2p8affineqb $0, %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "multishift": lambda i: f"vpmultishiftqb %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "shufbit": lambda i: f"vpshufbitqmb %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%k{1 + i % 3}",
    "maskadd": lambda i: f"vpaddb %%zmm{i % 4}, %%zmm{(i + 2) % 4}, %%zmm{4 + i % 6}%{{%%k{1 + i % 3}%}}",
    "move": lambda i: f"vmovdqa32 %%zmm{i % 4}, %%zmm{4 + i % 6}",
    "broadcast": lambda i: f"vpbroadcastd {4 * (i % 8)}(%%rsp), %%zmm{4 + i % 6}",
    "load": lambda i: f"vmovdqu32 {64 * (i % 8)}(%%rsp), %%zmm{4 + i % 6}",
    "varshift": lambda i: f"vpsrlvd %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "permb": lambda i: f"vpermb %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "permps": lambda i: f"vpermps %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "mulps": lambda i: f"vmulps %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "cvtbf16": lambda i: f"vcvtne2ps2bf16 %%zmm{i % 4}, %%zmm{(i + 1) % 4}, %%zmm{4 + i % 6}",
    "store": lambda i: f"vmovdqu32 %%zmm{i % 4}, {-512 - 64 * (i % 8)}(%%rsp)",
}

# the /proc/cpuinfo flag a kind needs beyond AVX512F / BW
NEEDS = {"cvtbf16": "avx512_bf16", "dpbusd": "avx512_vnni", "affine": "gfni", "multishift": "avx512vbmi",
         "permb": "avx512vbmi", "shufbit": "avx512_bitalg"}

STANDARD = [
    {"dpbusd": 12},
    {"shift": 8},
    {"ternlog": 8},
    {"and": 8},
    {"affine": 8},
    {"dpbusd": 12, "shift": 3, "and": 4},  # the 2-bit code path of a word row (16 columns, three digits)
    {"dpbusd": 12, "shift": 6},
    {"dpbusd": 12, "ternlog": 4},
    {"dpbusd": 12, "and": 8},
    {"dpbusd": 12, "and": 16},
    {"dpbusd": 12, "shift": 6, "and": 8},
    {"dpbusd": 12, "affine": 4},
    {"dpbusd": 12, "shift": 6, "ternlog": 4, "and": 4},  # the 3-bit code path
    {"dpbusd": 12, "shift": 6, "ternlog": 4, "and": 4, "broadcast": 3},
    {"dpbusd": 12, "shift": 6, "ternlog": 4, "and": 4, "move": 6},
    {"dpbusd": 12, "shift": 6, "ternlog": 4, "and": 4, "multishift": 1},  # with the hi bits' spread
    {"dpbusd": 12, "shufbit": 4},
    {"dpbusd": 12, "maskadd": 4},
    {"dpbusd": 12, "shift": 3, "and": 4, "shufbit": 4, "maskadd": 4},  # 3-bit codes as lo + 4 where a hi bit is set
]

PROGRAM = r"""#include <algorithm>
#include <cstdio>

#include "cpu_clock.h"

int main() {
  alignas(64) static char scratch[1024];
  (void)scratch;
  const long iters = 10000000;
  double best = 1e9;
  for (int r = 0; r < 3; ++r) {
    const double t = seconds();
    for (long i = 0; i < iters; ++i) __asm__ volatile("BODY" ::: "memory");
    best = std::min(best, seconds() - t);
  }
  std::printf("%.2f\n", best * clock_hz() / iters);
}
"""


def body(mix: dict[str, int]) -> str:
    """The loop body: the kinds' instructions interleaved round-robin, as a compiler would schedule them."""
    queues = [[KINDS[kind](i) for i in range(count)] for kind, count in mix.items()]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return r"\n".join(out)


def cycles(mix: dict[str, int], workdir: Path) -> float:
    src, exe = workdir / "mix.cpp", workdir / "mix"
    src.write_text(PROGRAM.replace("BODY", body(mix)))
    subprocess.run(["g++", "-O2", f"-I{HERE}", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mgfni", "-mavx512vbmi",
                    "-mavx512bitalg", "-o", str(exe), str(src)], check=True)
    return float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def parse(items: list[str]) -> dict[str, int]:
    mix = {}
    for item in items:
        kind, _, count = item.partition("=")
        if kind not in KINDS or not count.isdigit():
            raise SystemExit(f"mix item {item!r}: expected KIND=COUNT with KIND one of {', '.join(KINDS)}")
        mix[kind] = int(count)
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mix", nargs="*", help="KIND=COUNT ... (default: the standard mixes)")
    args = ap.parse_args()
    mixes = [parse(args.mix)] if args.mix else STANDARD
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    with tempfile.TemporaryDirectory() as tmp:
        for mix in mixes:
            name = ", ".join(f"{count} {kind}" for kind, count in mix.items())
            missing = sorted(({"avx512f", "avx512bw"} | {NEEDS[k] for k in mix if k in NEEDS}) - flags)
            if missing:
                print(f"{name}: this CPU lacks {', '.join(missing)}", flush=True)
                continue
            print(f"{name}: {cycles(mix, Path(tmp)):.2f} cycles per iteration", flush=True)


if __name__ == "__main__":
    sys.exit(main())
