"""How saliq._C is built: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is found.

- csrc/cpu/*.cpp -> a torch CppExtension with OpenMP. No -march=native: the SIMD code paths carry
  function-level target attributes (AVX2/FMA, AVX-512/VNNI) and are chosen at run time from the CPU's
  features, with a portable fallback, so one build runs on every x86-64 machine.
- csrc/cuda/*.cu -> compiled by nvcc for sm_80 and sm_90a into plain host objects (the .cu files include
  no torch headers: they expose extern "C" launchers), linked into the same extension together with the
  static CUDA runtime. The macro SALIQ_WITH_CUDA tells the C++ side that the launchers exist.

The toolkit is found from CUDA_HOME / CUDA_PATH, else from `nvcc` on PATH; SALIQ_NO_CUDA=1 skips it.
libstdc++ is always linked dynamically: some Python builds put `-static-libstdc++` in the flags every
extension is linked with, and a second, static libstdc++ beside the one torch has loaded crashed (SIGSEGV in
std::codecvt) the first time an error message formatted a number.
MAX_JOBS bounds the parallel compiler processes (C++ via ninja, nvcc via a thread pool).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from typing import Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CUDA_GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
CUDA_ARCHS = ("sm_80", "sm_90a")
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo"]


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _max_jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, min(4, os.cpu_count() or 1))


def find_cuda_toolkit() -> Optional[dict]:
    """{'nvcc', 'root', 'cudart_static'} of the CUDA toolkit to build with, or None when there is none."""
    if os.environ.get("SALIQ_NO_CUDA", "") not in ("", "0"):
        return None
    nvcc = None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            nvcc = os.path.join(home, "bin", "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc may be a wrapper script: ask it where its toolkit lives (the TOP of a dry run)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    text = out.stdout + out.stderr
    top = re.search(r"^#\$ TOP=(.*)$", text, re.M)
    root = os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(nvcc))
    lib_dirs = re.findall(r'-L"?([^"\s]+)"?', "".join(re.findall(r"^#\$ LIBRARIES=(.*)$", text, re.M)))
    lib_dirs += [os.path.join(root, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    for d in lib_dirs:
        candidate = os.path.join(os.path.realpath(d), "libcudart_static.a")
        if os.path.exists(candidate):
            return {"nvcc": nvcc, "root": root, "cudart_static": candidate}
    print(f"saliq: nvcc found at {nvcc} but not libcudart_static.a; building without CUDA", file=sys.stderr)
    return None


def compile_cuda_objects(toolkit: dict, build_dir: str) -> list[str]:
    """nvcc -c every csrc/cuda/*.cu into build_dir; returns the object paths (recompiles when stale)."""
    sources = sorted(glob(os.path.join(CSRC, "cuda", "*.cu")))
    headers = glob(os.path.join(CSRC, "common", "*.h")) + glob(os.path.join(CSRC, "cuda", "*.h")) + \
        glob(os.path.join(CSRC, "cuda", "*.cuh"))
    newest_header = max((os.path.getmtime(h) for h in headers), default=0.0)
    os.makedirs(build_dir, exist_ok=True)

    def compile_one(src: str) -> str:
        obj = os.path.join(build_dir, os.path.basename(src) + ".o")
        if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header):
            return obj
        cmd = [toolkit["nvcc"], "-c", src, "-o", obj, "-I", CSRC, *NVCC_FLAGS, *CUDA_GENCODE]
        print("saliq: " + " ".join(_rel(c) if c.startswith(ROOT) else c for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
        return obj

    with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
        return list(pool.map(compile_one, sources))


def without_static_libstdcxx(cmd: list[str]) -> list[str]:
    """A link command with `-static-libstdc++` removed (see the module docstring)."""
    return [a for a in cmd if a != "-static-libstdc++"]


def ext_modules():
    """The saliq._C extension (its CUDA objects are added at build time by the build_ext command)."""
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(_rel(p) for p in glob(os.path.join(CSRC, "cpu", "*.cpp")))
    depends = sorted(_rel(p) for p in glob(os.path.join(CSRC, "common", "*.h")) + glob(os.path.join(CSRC, "cpu", "*.h")))
    return [CppExtension(
        name="saliq._C",
        sources=sources,
        depends=depends,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": list(CXX_FLAGS)},
        extra_link_args=["-fopenmp"],
    )]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class SaliqBuildExtension(BuildExtension):
        """BuildExtension that first compiles csrc/cuda with nvcc when a toolkit is present."""

        def build_extensions(self):
            for attr in ("linker_so", "linker_so_cxx"):  # the shared-object link commands, env LDFLAGS included
                cmd = getattr(self.compiler, attr, None)
                if cmd and "-static-libstdc++" in cmd:
                    print(f"saliq: linking libstdc++ dynamically (dropped -static-libstdc++ from {attr})", flush=True)
                    setattr(self.compiler, attr, without_static_libstdcxx(cmd))
            toolkit = find_cuda_toolkit()
            for ext in self.extensions:
                if ext.name != "saliq._C":
                    continue
                if toolkit is None:
                    print("saliq: no CUDA toolkit found; building saliq._C for the CPU only", flush=True)
                    continue
                objects = compile_cuda_objects(toolkit, os.path.join(os.path.abspath(self.build_temp), "cuda"))
                ext.extra_objects = list(ext.extra_objects or []) + objects + [toolkit["cudart_static"]]
                ext.libraries = list(ext.libraries or []) + ["rt", "pthread", "dl"]
                ext.define_macros = list(ext.define_macros or []) + [("SALIQ_WITH_CUDA", "1")]
            super().build_extensions()

    return {"build_ext": SaliqBuildExtension.with_options(use_ninja=True)}
