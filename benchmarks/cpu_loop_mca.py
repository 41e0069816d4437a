"""What one word row of an int8 GEMV kernel costs, from its machine code: compiles a form's source as the build does
(`g++ -O3 -S`), finds the kernel instance of a bit width and digit count at M = 1 (CPU word order, groups of 64),
takes its hot loop (the basic block holding the most dot products: one word row of 16 or 64 columns), and prints
the loop's instructions by mnemonic and, where `llvm-mca` is installed, its model of the loop's cycles and of each
pipe's load. For the AVX2 form on a Zen 5 VM the model (`-mcpu=znver3`) came within 5% of `make gemv-cycles` (2-bit
16.5 against 17.3 cycles a word row, 3-bit 28.1 against 29); it has no timing of its own for AVX-VNNI (the VEX
form's 3-bit loop: 17.1 modelled, 23.3 measured).

    python benchmarks/cpu_loop_mca.py avx2 3 3             # FORM BITS DIGITS
    python benchmarks/cpu_loop_mca.py vnni 2 3 --mcpu znver4
    python benchmarks/cpu_loop_mca.py --table              # the 256-bit forms on the CPUs that run them

`--table` prints, per CPU model, the cycles of a word row and the largest one-thread copy rate (bytes per clock)
at which that loop alone still reads at 70% of copy: what the CPU decode bar asks of a core that has no AVX-512.

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


# bytes a word row of 16 columns reads at M = 1: the codes (3-bit: the hi plane's 16 bits a column too) and a
# quarter of a group's scales and zero points (groups of 64: 4 word rows); three digits go with fp32 x and fp32
# scales, two with fp16 / bf16 x and 16-bit scales; zero points are int16
def row_bytes(bits: int, digits: int) -> int:
    codes = 64 if bits == 2 else 96 if bits == 3 else 128
    rows_per_group = 8 if bits == 4 else 4
    return codes + 16 * ((4 if digits == 3 else 2) + 2) // rows_per_group


def compile_form(form: str, tmp: Path) -> str:
    asm_path = tmp / f"{form}.s"
    subprocess.run(["g++", "-O3", "-std=c++17", "-fopenmp-simd", "-Wno-psabi", "-Icsrc", "-S", "-o", str(asm_path),
                    FORMS[form][0]], cwd=ROOT, check=True)
    return asm_path.read_text()


def loop_of(asm: str, form: str, bits: int, digits: int) -> tuple[list[str], int] | None:
    """The hot loop of the M = 1 instance (CPU word order, groups of 64) and the columns of its word row."""
    _, dot, replicas, lanes = FORMS[form]
    rows_per_group = 8 if bits == 4 else 4
    bodies = functions(asm)
    names = subprocess.run(["c++filt"], input="\n".join(bodies), capture_output=True, text=True,
                           check=True).stdout.splitlines()  # one c++filt for every symbol
    for (symbol, body), name in zip(bodies.items(), names):
        m = INSTANCE.search(name)
        if m is None or m.group(7) != "true":
            continue
        b, d, rows_of_x, vectors, group_rows, copies = (int(v) for v in m.groups()[:6])
        if (b, d, rows_of_x, group_rows, copies) == (bits, digits, 1, rows_per_group, replicas):
            return hot_loop(body, dot), vectors * lanes
    return None


def model(loop: list[str], mcpu: str, tmp: Path) -> tuple[float | None, str]:
    """llvm-mca's cycles an iteration of the loop, and its report (or why there is none)."""
    mca = shutil.which("llvm-mca")
    if mca is None:
        return None, "llvm-mca not installed: no cycle model"
    loop_path = tmp / "loop.s"
    loop_path.write_text("\n".join(loop) + "\n")
    run = subprocess.run([mca, f"-mcpu={mcpu}", "-iterations=200", "-resource-pressure", "-timeline=false",
                          "-instruction-info=false", str(loop_path)], capture_output=True, text=True)
    cycles = re.search(r"Total Cycles:\s+(\d+)", run.stdout)
    if cycles is None:  # e.g. AVX-512 on a model without it (znver3): name a CPU that has it (icelake-server)
        return None, f"llvm-mca -mcpu={mcpu} gave no model: {run.stderr.strip().splitlines()[-1:]}"
    return int(cycles.group(1)) / 200, run.stdout


# CPUs whose widest int8 form is a 256-bit one, as llvm-mca (LLVM 14) models them; its `alderlake` is the Skylake
# client model with Alder Lake's instructions, so the AVX-VNNI rows there are a sketch, not Golden Cove's pipes
TABLE_CPUS = {"avx2": ("haswell", "skylake", "znver1", "znver2", "znver3"), "avx2vnni": ("alderlake",)}


def table() -> int:
    """Markdown: per CPU model and 256-bit form, cycles a word row and the one-thread copy rate (bytes per clock)
    up to which the loop alone keeps 70% of it."""
    print("| form | llvm-mca CPU | 2-bit, fp32 x (3 digits) | 2-bit, bf16 x (2 digits) | 3-bit, fp32 x | "
          "3-bit, bf16 x |")
    print("|---|---|---|---|---|---|")
    cases = [(2, 3), (2, 2), (3, 3), (3, 2)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for form, cpus in TABLE_CPUS.items():
            asm = compile_form(form, tmp)
            loops = {case: loop_of(asm, form, *case) for case in cases}
            for mcpu in cpus:
                cells = []
                for bits, digits in cases:
                    found = loops[(bits, digits)]
                    cycles = None if found is None else model(found[0], mcpu, tmp)[0]
                    if cycles is None:
                        cells.append("-")
                        continue
                    per16 = cycles * 16 / found[1]
                    cells.append(f"{per16:.1f} cycles, {row_bytes(bits, digits) / (0.7 * per16):.1f} B/clk")
                print(f"| {form} | {mcpu} | " + " | ".join(cells) + " |")
    print("\nCycles: llvm-mca's model of the hot loop of one word row of 16 columns (M = 1, groups of 64), no "
          "epilogue, loads from L1. B/clk: the bytes that word row reads divided by 0.7 x its cycles, the "
          "largest one-thread copy rate, in bytes per core clock, at which the loop alone still reads at 70% of it.")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("form", nargs="?", choices=sorted(FORMS))
    ap.add_argument("bits", nargs="?", type=int, choices=(2, 3, 4))
    ap.add_argument("digits", nargs="?", type=int, choices=(1, 2, 3))
    ap.add_argument("--mcpu", default="znver3", help="llvm-mca's CPU model (default znver3)")
    ap.add_argument("--table", action="store_true",
                    help="the 256-bit forms on the CPU models of the machines that run them (markdown)")
    args = ap.parse_args(argv)
    if args.table:
        return table()
    if args.digits is None:
        ap.error("FORM BITS DIGITS, or --table")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = loop_of(compile_form(args.form, tmp), args.form, args.bits, args.digits)
        if found is None:
            print(f"no M = 1 instance of {args.bits}-bit, {args.digits} digit(s) in {FORMS[args.form][0]}",
                  file=sys.stderr)
            return 1
        loop, columns = found
        counts = collections.Counter(mnemonic(ins) for ins in loop)
        print(f"{args.form} {args.bits}-bit {args.digits} digit(s), M = 1: the loop of one word row of {columns} "
              f"columns, {len(loop)} instructions")
        print(", ".join(f"{n} {op}" for op, n in counts.most_common()))
        per_row, report = model(loop, args.mcpu, tmp)
        if per_row is None:
            print(f"({report})")
            return 0
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
