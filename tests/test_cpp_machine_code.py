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
