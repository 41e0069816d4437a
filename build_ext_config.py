"""How saliq._C is built: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit is found.

- csrc/cpu/*.cpp -> a torch CppExtension with OpenMP. No -march=native: the SIMD code paths carry
  function-level target attributes (AVX2/FMA, AVX-512/VNNI) and are chosen at run time from the CPU's
  features, with a portable fallback, so one build runs on every x86-64 machine.
- csrc/cuda/*.cu -> compiled by nvcc for sm_80 and sm_90a into plain host objects (the .cu files include
  no torch headers: they expose extern "C" launchers), linked into the same extension together with the
  static CUDA runtime. The macro SALIQ_WITH_CUDA tells the C++ side that the launchers exist.

The toolkit is found from CUDA_HOME / CUDA_PATH, else from `nvcc` on PATH; SALIQ_NO_CUDA=1 skips it.
SALIQ_CUDA_ARCHS (e.g. "sm_90a") builds a subset of the targets: one GPU's build in about half the time.
libstdc++ is always linked dynamically, against the one torch has loaded: a second, static libstdc++ inside
saliq._C crashed (SIGSEGV in std::codecvt) the first time an error message formatted a number. Some Python
builds put `-static-libstdc++` in the flags every extension is linked with (dropped), and some compilers link
their own libstdc++ statically with no flag on the line at all (seen on an H200 machine's GCC), so the shared
library is also named first on the link line, where its symbols resolve before any static copy.
MAX_JOBS bounds the parallel compiler processes (C++ via ninja, nvcc via a thread pool; each nvcc compiles its
two targets in parallel).
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
CUDA_ARCHS = ("sm_80", "sm_90a")
# -Wno-psabi: the AVX-512 kernels instantiate word_order.h's templates on 64-byte vectors and inline them; GCC's note
# that a copy compiled without AVX-512 would pass them differently concerns a copy never called (a diagnostic
# pragma around the templates does not reach it)
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
             "-Wno-psabi"]
# --threads 2: the two targets of a file compile in parallel (the decode kernel's files hold most instances)
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo", "--threads", "2"]


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


def cuda_archs() -> list[str]:
    """The targets to build: CUDA_ARCHS, or the subset SALIQ_CUDA_ARCHS names (comma or space separated)."""
    wanted = os.environ.get("SALIQ_CUDA_ARCHS", "").replace(",", " ").split() or list(CUDA_ARCHS)
    unknown = [a for a in wanted if a not in CUDA_ARCHS]
    if unknown:
        raise ValueError(f"SALIQ_CUDA_ARCHS={os.environ['SALIQ_CUDA_ARCHS']!r} names {unknown}; the kernels are "
                         f"built for {list(CUDA_ARCHS)} or a subset of them")
    return wanted


def cuda_gencode() -> list[str]:
    """nvcc -gencode arguments for cuda_archs()."""
    return [arg for a in cuda_archs() for arg in ("-gencode", f"arch=compute_{a[3:]},code={a}")]


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
        cmd = [toolkit["nvcc"], "-c", src, "-o", obj, "-I", CSRC, *NVCC_FLAGS, *cuda_gencode()]
        print("saliq: " + " ".join(_rel(c) if c.startswith(ROOT) else c for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
        return obj

    with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
        return list(pool.map(compile_one, sources))


def without_static_libstdcxx(cmd: list[str]) -> list[str]:
    """A link command with `-static-libstdc++` removed (see the module docstring)."""
    return [a for a in cmd if a != "-static-libstdc++"]


def loaded_libstdcxx(maps: str = "/proc/self/maps") -> Optional[str]:
    """Path of the libstdc++ shared object this process (which has imported torch) has loaded, or None."""
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def dynamic_libstdcxx_args(path: Optional[str]) -> list[str]:
    """Link arguments that put the shared libstdc++ first on the link line, so its symbols resolve there even
    when the toolchain adds a static one later (see the module docstring): the library torch runs with when
    known, else whatever -lstdc++ finds."""
    return ["-Wl,--push-state,--no-as-needed", path or "-lstdc++", "-Wl,--pop-state"]


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
            libstdcxx = loaded_libstdcxx()
            print(f"saliq: linking libstdc++ dynamically ({libstdcxx or '-lstdc++'})", flush=True)
            for ext in self.extensions:
                ext.extra_link_args = list(ext.extra_link_args or []) + dynamic_libstdcxx_args(libstdcxx)
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
