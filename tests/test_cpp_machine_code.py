"""What the compiler made of the CPU kernels: checks on saliq._C's machine code that no comparison of outputs
can see (a lost prefetch changes the speed, never a result)."""
import shutil
import subprocess

import pytest

from saliq import _C

OBJDUMP = shutil.which("objdump")


def functions_of(path):
    """{demangled function name: its instructions} from objdump's disassembly of `path`."""
    out = subprocess.run([OBJDUMP, "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    functions, name = {}, None
    for line in out.splitlines():
        if line.endswith(">:"):
            name = line[line.index("<") + 1:-2]
            functions[name] = []
        elif name is not None and "\t" in line:
            functions[name].append(line.split("\t", 1)[1].strip())
    return functions


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump (binutils) on this machine")
def test_int8_gemv_kernels_prefetch_into_l1_and_l2():
    """The int8 GEMV prefetches the next panel into L1, or into L2 only where rows alias in L1 (chosen per call).
    Written as `if (l2) _mm_prefetch(p, _MM_HINT_T1); else _mm_prefetch(p, _MM_HINT_T0);`, GCC 12 merged the two
    into one prefetch with a hint that was no longer a constant and dropped it without a warning: every int8
    kernel was built with no prefetch at all. csrc/cpu/prefetch.h issues them with asm."""
    kernels = {name: code for name, code in functions_of(_C.__file__).items()
               if "int8_" in name and any(op.startswith(("vpdpbusd", "vpmaddubsw")) for op in code)}
    assert kernels, "no int8 GEMV kernel found in saliq._C"
    for name, code in kernels.items():
        ops = {op.split()[0] for op in code}
        assert {"prefetcht0", "prefetcht1"} <= ops, f"{name} lacks a prefetch level: {sorted(ops & {'prefetcht0', 'prefetcht1'})}"


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump (binutils) on this machine")
def test_avx_vnni_form_is_vex_on_ymm0_to_15():
    """The int8 GEMV for CPUs with AVX-VNNI and no AVX-512 (packed_gemv_avx2_vnni.cpp) cannot run on a CPU without
    AVX-VNNI, so its arithmetic is tested through its EVEX twin (the same source and instruction, selected by the
    avx2vnni cap on AVX-512 CPUs). What only the machine code shows: the VEX encoding of vpdpbusd, on ymm registers
    0-15 only, and no AVX-512 instruction (no zmm, masks or embedded broadcasts) that would fault on such a CPU."""
    import re

    if not _C.built_with_avx_vnni:
        pytest.skip("saliq._C was built by a compiler without AVX-VNNI (GCC < 11, clang < 12): no VEX form")
    functions = functions_of(_C.__file__)
    vex = {name: code for name, code in functions.items() if "int8_panel" in name and "DotVex" in name}
    evex = {name: code for name, code in functions.items() if "int8_panel" in name and "DotEvex" in name}
    assert vex and evex, "the 256-bit VNNI forms are missing from saliq._C"
    for name, code in vex.items():
        assert any(op.startswith("{vex} vpdpbusd") for op in code), f"{name}: no VEX vpdpbusd"
        text = "\n".join(code)
        avx512 = re.search(r"zmm|%k[0-7]|\{1to|[xy]mm(1[6-9]|2[0-9]|3[01])\b", text)
        assert avx512 is None, f"{name}: an AVX-512 instruction ({avx512.group(0)})"
    for name, code in evex.items():
        assert any(op.startswith("vpdpbusd") and "ymm" in op for op in code), f"{name}: no 256-bit EVEX vpdpbusd"
