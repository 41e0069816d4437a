"""What one word row of an int8 GEMV kernel costs, from its machine code: compiles a form's source as the build does
(`g++ -O3 -S`), finds the kernel instance of a bit width and digit count at M = 1 (CPU word order, groups of 64),
takes its hot loop (the basic block holding the most dot products: one word row of 16 or 64 columns), and prints
the loop's instructions by mnemonic and, where `llvm-mca` is installed, its model of the loop's cycles and of each
pipe's load. For the AVX2 form on a Zen 5 VM the model (`-mcpu=znver3`) came within 5% of `make gemv-cycles` (2-bit
16.5 against 17.3 cycles a word row, 3-bit 28.1 against 29); it has no timing of its own for AVX-VNNI (the VEX
form's 3-bit loop: 17.1 modelled, 23.3 measured).

    python benchmarks/cpu_loop_mca.py avx2 3 3             # FORM BITS DIGITS
    python benchmarks/cpu_loop_mca.py vnni 2 3 --mcpu znver4

FORM: avx2 | avx2vnni | vnni | novbmi | mad (as `build/cpu_gemv_cycles`). Needs g++; llvm-mca is optional.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# form -> (source, dot-product mnemonic, digit copies the kernel reads at M = 1 (packed_gemv.h), lanes a vector)
FORMS = {
    "avx2": ("csrc/cpu/packed_gemv_avx2_int8.cpp", "vpmaddubsw", 8, 8),
    "avx2vnni": ("csrc/cpu/packed_gemv_avx2_vnni.cpp", "vpdpbusd", 8, 8),
    "vnni": ("csrc/cpu/packed_gemv_avx512_vnni.cpp", "vpdpbusd", 1, 16),
    "novbmi": ("csrc/cpu/packed_gemv_avx512_vnni_novbmi.cpp", "vpdpbusd", 1, 16),
    "mad": ("csrc/cpu/packed_gemv_avx512_mad.cpp", "vpmaddubsw", 1, 16),
}
# int8_panel<V, BITS, P, MT, NV, GR, R, CPU_ORDER>
INSTANCE = re.compile(r"int8_panel<[^,]+, (\d+), (\d+), (\d+), (\d+), (\d+), (\d+), (true|false)>")


def functions(asm: str) -> dict[str, list[str]]:
    """Mangled int8_panel symbol -> its lines."""
    out, current = {}, None
    for line in asm.splitlines():
        m = re.match(r"^(_Z\S*int8_panel\S*):", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            if line.startswith("\t.size"):
                current = None
            else:
                out[current].append(line)
    return out


def mnemonic(ins: str) -> str:
    """`vpdpbusd` of `{vex} vpdpbusd %ymm1, ...` (GCC marks the VEX encoding of AVX-VNNI)."""
    words = ins.split()
    return words[1] if words[0].startswith("{") and len(words) > 1 else words[0]


def hot_loop(body: list[str], dot: str) -> list[str]:
    """The basic block (instructions between labels) with the most dot products."""
    blocks, block = [], []
    for line in body:
        if re.match(r"^\.L\w+:", line):
            blocks.append(block)
            block = []
        elif line.startswith("\t") and not line.startswith("\t."):
            block.append(line.strip())
    blocks.append(block)
    return max(blocks, key=lambda b: sum(mnemonic(ins) == dot for ins in b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("form", choices=sorted(FORMS))
    ap.add_argument("bits", type=int, choices=(2, 3, 4))
    ap.add_argument("digits", type=int, choices=(1, 2, 3))
    ap.add_argument("--mcpu", default="znver3", help="llvm-mca's CPU model (default znver3)")
    args = ap.parse_args(argv)
    source, dot, replicas, lanes = FORMS[args.form]
    with tempfile.TemporaryDirectory() as tmp:
        asm_path = Path(tmp) / "kernel.s"
        subprocess.run(["g++", "-O3", "-std=c++17", "-fopenmp-simd", "-Icsrc", "-S", "-o", str(asm_path), source],
                       cwd=ROOT, check=True)
        asm = asm_path.read_text()
        rows_per_group = 8 if args.bits == 4 else 4
        loop, columns = None, 0
        bodies = functions(asm)
        names = subprocess.run(["c++filt"], input="\n".join(bodies), capture_output=True, text=True,
                               check=True).stdout.splitlines()  # one c++filt for every symbol
        for (symbol, body), name in zip(bodies.items(), names):
            m = INSTANCE.search(name)
            if m is None or m.group(7) != "true":
                continue
            bits, digits, rows_of_x, vectors, group_rows, copies = (int(v) for v in m.groups()[:6])
            if (bits, digits, rows_of_x, group_rows, copies) == (args.bits, args.digits, 1, rows_per_group, replicas):
                loop, columns = hot_loop(body, dot), vectors * lanes
                break
        if loop is None:
            print(f"no M = 1 instance of {args.bits}-bit, {args.digits} digit(s) in {source}", file=sys.stderr)
            return 1
        counts = collections.Counter(mnemonic(ins) for ins in loop)
        print(f"{args.form} {args.bits}-bit {args.digits} digit(s), M = 1: the loop of one word row of {columns} "
              f"columns, {len(loop)} instructions")
        print(", ".join(f"{n} {op}" for op, n in counts.most_common()))
        mca = shutil.which("llvm-mca")
        if mca is None:
            print("(llvm-mca not installed: no cycle model)")
            return 0
        loop_path = Path(tmp) / "loop.s"
        loop_path.write_text("\n".join(loop) + "\n")
        run = subprocess.run([mca, f"-mcpu={args.mcpu}", "-iterations=200", "-resource-pressure",
                              "-timeline=false", "-instruction-info=false", str(loop_path)], capture_output=True,
                             text=True)
        report = run.stdout
        cycles = re.search(r"Total Cycles:\s+(\d+)", report)
        if cycles is None:  # e.g. AVX-512 on a model without it (znver3): name a CPU that has it (icelake-server)
            print(f"llvm-mca -mcpu={args.mcpu} gave no model: {run.stderr.strip().splitlines()[-1:]}")
            return 0
        per_row = int(cycles.group(1)) / 200
        print(f"llvm-mca -mcpu={args.mcpu}: {per_row:.1f} cycles a word row of {columns} columns, "
              f"{per_row * 16 / columns:.1f} per 16 columns (`make gemv-cycles`' unit)")
        pressure = report.split("Resource pressure per iteration:")
        if len(pressure) > 1:
            names = re.findall(r"^\[(\S+)\]\s+-\s+(\S+)", report, re.M)
            values = pressure[1].strip().splitlines()[1].split()
            print("per pipe and word row: " + ", ".join(f"{name} {value}" for (_, name), value in zip(names, values)
                                                       if value != "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
