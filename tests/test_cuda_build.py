"""The CUDA part of saliq._C: built for sm_80 and sm_90a when a toolkit is present; importable without a GPU;
a clear error when a cuda op is called with no usable GPU."""
import functools
import os
import shutil
import subprocess

import pytest
import torch

from saliq import cpp_backend as cpp  # noqa: E402  (saliq._C not built: a collection error, not a skip)


def _load_build_config():
    """build_ext_config.py from the repository root (not an installed module)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build_ext_config.py")
    spec = importlib.util.spec_from_file_location("build_ext_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_ext_config = _load_build_config()

TOOLKIT = build_ext_config.find_cuda_toolkit()
needs_toolkit = pytest.mark.skipif(TOOLKIT is None, reason="no CUDA toolkit (nvcc) on this machine")


def find_cuobjdump():
    candidates = [os.path.join(TOOLKIT["root"], "bin", "cuobjdump")] if TOOLKIT else []
    candidates.append(shutil.which("cuobjdump"))
    try:  # Triton's wheel ships one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@needs_toolkit
def test_libstdcxx_is_linked_dynamically():
    # a static libstdc++ inside _C beside torch's shared one segfaulted on the first error message that
    # formatted a number (seen on a GPU machine whose Python links extensions with -static-libstdc++)
    cmd = ["g++", "-shared", "-static-libstdc++", "a.o", "-o", "_C.so"]
    assert build_ext_config.without_static_libstdcxx(cmd) == ["g++", "-shared", "a.o", "-o", "_C.so"]
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf to list _C's shared libraries")
    from saliq import _C

    dynamic = subprocess.run([readelf, "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, dynamic


def test_cuda_archs_follow_the_environment(monkeypatch):
    monkeypatch.delenv("SALIQ_CUDA_ARCHS", raising=False)
    assert build_ext_config.cuda_archs() == ["sm_80", "sm_90a"]
    monkeypatch.setenv("SALIQ_CUDA_ARCHS", "sm_90a")
    assert build_ext_config.cuda_gencode() == ["-gencode", "arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("SALIQ_CUDA_ARCHS", "sm_80,sm_86")
    with pytest.raises(ValueError, match=r"SALIQ_CUDA_ARCHS='sm_80,sm_86' names \['sm_86'\]"):
        build_ext_config.cuda_archs()


def test_the_link_names_the_loaded_libstdcxx_first(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libstdc++.so.6.0.33\n"
                    "7f02-7f03 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n")
    path = build_ext_config.loaded_libstdcxx(str(maps))
    assert path == "/usr/lib/libstdc++.so.6.0.33"
    assert build_ext_config.dynamic_libstdcxx_args(path) == [
        "-Wl,--push-state,--no-as-needed", path, "-Wl,--pop-state"]
    assert build_ext_config.loaded_libstdcxx(str(tmp_path / "absent")) is None
    assert "-lstdc++" in build_ext_config.dynamic_libstdcxx_args(None)


def test_extension_was_built_with_cuda():
    assert cpp.WITH_CUDA, "a CUDA toolkit is present but saliq._C was built without CUDA: rebuild"


@needs_toolkit
def test_cuda_code_for_sm80_and_sm90a():
    """Every target of the build (both unless SALIQ_CUDA_ARCHS named one) is in the binary."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    listing = subprocess.run([tool, "--list-elf", cpp._C.__file__], capture_output=True, text=True, check=True).stdout
    for arch in build_ext_config.cuda_archs():
        assert f".{arch}." in listing, f"no {arch} cubin in {cpp._C.__file__}:\n{listing}"
    kernels = subprocess.run([tool, "--dump-resource-usage", cpp._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    for name in ("packed_gemv_kernel", "decode_mma_kernel", "fake_quant_fwd_kernel", "fake_quant_bwd_kernel",
                 "sq_error_kernel", "sparse_addmm_kernel", "dequantize_kernel"):
        assert name in kernels, f"kernel {name} missing from the built cubins"


@functools.lru_cache(maxsize=1)
def _sass_dump(tool):
    return subprocess.run([tool, "-sass", cpp._C.__file__], capture_output=True, text=True, check=True).stdout


def _sass_of(tool, arch, kernel_fragment):
    """SASS text of the first function of `arch` whose mangled name contains kernel_fragment."""
    out, arch_now, keep = [], None, False
    for line in _sass_dump(tool).splitlines():
        if "code for sm_" in line:
            arch_now = line.split("code for ")[1].strip()
        elif "Function :" in line:
            if keep:
                break
            keep = arch_now == arch and kernel_fragment in line
        elif keep:
            out.append(line)
    return "\n".join(out)


@needs_toolkit
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_decode_gemv_uses_16_byte_loads_bit_tricks_and_warp_shuffles(bits):
    """The instructions issue 5 asks of the decode GEMV, read from the sm_90a SASS of its fp16 instance:
    128-bit global loads, lop3 unpacking and warp-shuffle reductions."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    sass = _sass_of(tool, "sm_90a", f"packed_gemv_kernelI6__halfLi{bits}E")
    assert sass, f"no sm_90a fp16 {bits}-bit packed_gemv_kernel in {cpp._C.__file__}"
    assert "LDG.E.128" in sass, "the packed words are not loaded 16 bytes at a time"
    assert "LOP3.LUT" in sass, "the unpacking does not use lop3"
    assert "SHFL.BFLY" in sass, "no warp-shuffle reduction"


@needs_toolkit
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_dequantize_kernel_writes_whole_words_with_16_byte_stores(bits):
    """The CUDA dequantize kernel is bound by the write of W: its whole-word fp16 instance stores 16 bytes at a
    time, keeps its values in registers and divides in 32 bits (a 64-bit division costs as much as the rest)."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    sass = _sass_of(tool, "sm_90a", f"dequantize_kernelI6__halfS1_Li{bits}ELb1E")
    assert sass, f"no sm_90a fp16 whole-word {bits}-bit dequantize_kernel in {cpp._C.__file__}"
    stores = [t for t in sass.splitlines() if "STG" in t]
    assert stores and all("STG.E.128" in t for t in stores), stores
    assert len(stores) == (2 if bits != 4 else 1), stores  # 32 bytes (16 codes) or 16 bytes (8 codes) a thread
    assert not any(op in sass for op in ("LDL", "STL")), "values spilled to local memory"
    assert "I2F.U64" not in sass, "a 64-bit division"


def _hot_loop(sass: str) -> list[str]:
    """Instructions of the innermost loop that holds the most HMMA: from a backward branch's target to it."""
    import re

    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]+);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    best = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if sum("HMMA" in t for t in body) > sum("HMMA" in t for t in best):
                best = body
    return best


@needs_toolkit
@pytest.mark.parametrize("bits,budget", [(2, 135), (3, 220), (4, 100)])
def test_decode_kernel_hot_loop_holds_its_instruction_budget(bits, budget):
    """The tensor-core decode kernel (fp16, M = 1, whole shapes), read from its sm_90a SASS: per 16-byte load of
    packed words at most one packed fma per code pair (3-bit: two), 3 mmas per 16 k of the 4 columns, no local
    memory, and at most `budget` instructions of the hot loop. At H200 bandwidth a warp may spend about 128
    instructions per 512 bytes it loads (16 bytes per lane): 2-bit, whose 16-byte loads carry the fewest
    bytes per code, sat at 141 when it reached 46% of copy bandwidth at 8192x28672 on an H200 and at 129 since
    its loads need no predicate (3-bit 222 -> 211, 4-bit 92 -> 91); the budgets are today's counts plus a small
    margin, so a change that adds work to the loop fails here first."""
    loop, loads, count = _decode_hot_loop(bits, subnormal=False)
    pairs = loads * 4 * (8 if bits != 4 else 4)  # 4 words per load, code pairs per word
    assert count("HFMA2") <= pairs * (2 if bits == 3 else 1), "more than one packed fma per code pair"
    assert len(loop) / loads <= budget, f"{len(loop) / loads:.0f} instructions per 16-byte load > {budget}"


def _decode_hot_loop(bits, subnormal):
    """The hot loop of the fp16 decode kernel's M = 1 whole-shape instance (sm_90a SASS), its 16-byte loads of packed
    words, and a counter of its instructions by prefix; checked on the way: 16-byte loads that bypass L1, 3 mmas per
    16 k of the 4 columns, no local memory."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    sass = _sass_of(tool, "sm_90a", f"decode_mma_kernelI6__halfLi{bits}ELi0ELi1ELb1ELb{int(subnormal)}E")
    assert sass, f"no sm_90a fp16 {bits}-bit decode_mma_kernel (M = 1, fast path, SUB={subnormal}) in {cpp._C.__file__}"
    loop = _hot_loop(sass)
    loads = sum("LDG.E.NA.128" in t for t in loop) // (2 if bits == 3 else 1)  # 3-bit: plus the 1-bit plane
    assert loads >= 1, "the packed words are not loaded 16 bytes at a time, bypassing L1"
    count = lambda op: sum(t.split()[0 if not t.startswith("@") else 1].startswith(op) for t in loop)  # noqa: E731
    assert count("HMMA") == loads * 3 * (4 if bits != 4 else 2), "unexpected mma count"
    assert not any(op in t for t in loop for op in ("LDL", "STL")), "registers spilled to local memory"
    return loop, loads, count


@needs_toolkit
@pytest.mark.parametrize("bits,budget", [(2, 118), (4, 86)])
def test_subnormal_codes_drop_the_packed_fmas(bits, budget):
    """The decode kernel's subnormal-code instance (fp16, M = 1, whole shapes; cuda_decode_mma_set_codes(1)), read
    from its sm_90a SASS: no packed fma in the hot loop, the same mmas as the default decode, no local memory, and
    at most `budget` instructions per 16-byte load (counted 113 at 2 bits and 81 at 4 bits, against 129 and 91 for
    the packed-fma decode)."""
    loop, loads, count = _decode_hot_loop(bits, subnormal=True)
    assert count("HFMA2") == 0, "a packed fma left in the subnormal-code loop"
    assert len(loop) / loads <= budget, f"{len(loop) / loads:.0f} instructions per 16-byte load > {budget}"


@needs_toolkit
def test_decode_codes_setting_is_checked():
    """_C.cuda_decode_mma_set_codes takes 0 or 1, returns the previous setting and names what it allows."""
    previous = cpp._C.cuda_decode_mma_set_codes(1)
    try:
        assert cpp._C.cuda_decode_mma_set_codes(0) == 1
        with pytest.raises(ValueError, match="codes must be 0"):
            cpp._C.cuda_decode_mma_set_codes(2)
        assert cpp._C.cuda_decode_mma_set_codes(0) == 0  # a refused value changes nothing
    finally:
        cpp._C.cuda_decode_mma_set_codes(previous)


@needs_toolkit
def test_the_tensor_core_probe_compiles(tmp_path):
    """benchmarks/probes/mma_subnormals.cu, which make gpu-check runs, builds for sm_90 (here: compiled only)."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "probes",
                       "mma_subnormals.cu")
    out = subprocess.run([TOOLKIT["nvcc"], "-O2", "-arch=sm_90", "-c", src, "-o", str(tmp_path / "probe.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_toolkit
def test_cuda_backend_registered():
    from saliq import backends

    for op in ("packed_matmul", "fake_quant_lwc_fwd", "fake_quant_lwc_bwd", "saliency_sq_error", "dequantize"):
        assert "cuda" in backends._impls and op in backends._impls["cuda"], op


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_ops_without_gpu_raise_clear_error():
    assert cpp.cuda_device_count() == 0
    W = torch.randn(4, 32)
    hi = lo = torch.zeros(4, 1)
    expected = "CUDA" if cpp.WITH_CUDA else "without CUDA"
    with pytest.raises(RuntimeError, match=expected):
        cpp.cuda_fake_quant_lwc_fwd(W, hi, lo, None, None, 2, 32, False)
    with pytest.raises(RuntimeError, match=expected):
        cpp.cuda_saliency_sq_error(W, W, None, False)
    with pytest.raises(RuntimeError, match=expected):
        cpp.cuda_dequantize(torch.zeros(2, 4, dtype=torch.int32), torch.empty(0, dtype=torch.int32), torch.ones(1, 4),
                            torch.zeros(1, 4, dtype=torch.int16), 2, 32, 32)
    with pytest.raises(RuntimeError, match=expected):
        cpp.cuda_packed_matmul(torch.randn(1, 32), torch.zeros(2, 4, dtype=torch.int32),
                               torch.empty(0, dtype=torch.int32), torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.int16),
                               2, 32, 32, None)
