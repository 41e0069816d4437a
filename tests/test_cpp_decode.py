"""The CPU GEMV on int8 activation digits (csrc/cpu/packed_gemv_int8.h) against saliq/ref.py.

Contract (docs/OPS.md): by default x is rounded per (row, weight group) to a grid of max|x_group| / Qmax with
three int8 digits for fp32 x (Qmax ~ 2^23) and two for fp16 / bf16 x (Qmax ~ 2^15); the codes times the
digits are exact integer sums. `set_cpu_gemv("exact")` restores fp32 products. Tolerances are the usual ones:
fp32 1e-5, fp16 2e-3, bf16 1e-2 (||out - ref|| / ||ref||).
"""
import os

import pytest
import torch

from saliq import packing, ref
from saliq import cpp_backend as cpp
from saliq.spec import QuantSpec

from test_cpp_backend import TOL, assert_close_rel, gen, poison_heap, random_packed, rel_err

# caps: AVX2 without and with 256-bit VNNI (the AVX-VNNI form; on an AVX-512 CPU its EVEX encoding), and AVX-512
# as three CPU generations have it (F/BW/VL: the AVX2 form of the kernel; + VNNI, no VBMI: the VNNI kernel with
# shuffled 3-bit hi bits; everything: with vpmultishiftqb)
_LEVEL = {"portable": 0, "avx2": 1, "avx2vnni": 1, "avx512bw": 2, "avx512vnni": 2, "avx512": 2}
ISAS = [i for i in ("avx2", "avx2vnni", "avx512bw", "avx512vnni", "avx512")
        if _LEVEL[i] <= _LEVEL[cpp._C.cpu_isa_detected()]]
CPU_FLAGS = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
pytestmark = pytest.mark.skipif(not ISAS, reason="the int8 kernels need AVX2")


@pytest.fixture(params=ISAS)
def isa(request):
    previous = cpp.cpu_isa()
    cpp.set_cpu_isa(request.param)
    yield request.param
    cpp.set_cpu_isa(previous)


@pytest.fixture
def gemv():
    previous = cpp.cpu_gemv()

    def use(name):
        cpp.set_cpu_gemv(name)

    yield use
    cpp.set_cpu_gemv(previous)


def case(n, k, bits, group_size, dtype, m, seed):
    p = random_packed(n, k, bits, group_size, dtype, seed=seed)
    x = torch.randn(m, k, generator=gen(seed + 1)).to(dtype)
    bias = torch.randn(n, generator=gen(seed + 2)).to(dtype) if m % 2 else None
    return (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, bias)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 320), (128, 256), (-1, 100), (-1, 4100)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_gemv_matches_ref(isa, gemv, bits, group_size, k, m, dtype):
    gemv("auto")
    n = 203  # not a multiple of any block: the tail columns take the portable kernel
    args = case(n, k, bits, group_size, dtype, m, seed=bits * 100 + m)
    poison_heap()
    out = cpp.packed_matmul(*args)
    assert_close_rel(out, ref.packed_matmul(*args), TOL[dtype], f"{isa} {dtype} m={m}")
    if dtype == torch.float32:  # three digits: within fp32 rounding of the exact path (long groups add up)
        gemv("exact")
        assert rel_err(out, cpp.packed_matmul(*args)) < 5e-6


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_codes_and_digits_stay_exact(isa, gemv, bits, group_size, dtype, sign):
    """The integer sums at their largest: every code at its maximum and every activation of a group at the same
    extreme, so every digit sits at the end of its range with one sign (the AVX2 kernel sums vpmaddubsw products
    in int16 over a few word rows: an overflow there would be far outside the tolerance). Each dtype's digits
    named, since fp32 x with M > 2 takes the exact kernel by default on AVX2."""
    gemv("int8x3" if dtype == torch.float32 else "int8x2")
    n, k, m = 45, 512, 3
    q = torch.full((n, k), (1 << bits) - 1)
    scales = (torch.rand(n, k // group_size, generator=gen(bits)) + 0.5) * 0.02
    p = packing.pack_weight(q, scales, torch.zeros(n, k // group_size), QuantSpec(bits=bits, group_size=group_size),
                            dtype=dtype)
    # a group of equal values rounds to -Qmax or +Qmax: every digit +-127; a row of a power-of-two ladder
    # below the maximum gives digits of -128 / 127 in the lower places too
    x = torch.full((m, k), sign)
    x[1] = sign * (1.0 - 2.0 ** -torch.arange(k).remainder(group_size).clamp(max=20).float())
    x[1, ::group_size] = sign
    x = x.to(dtype)
    args = (x, p.qweight, p.qweight_hi, p.scales, p.zeros, bits, group_size, k, None)
    assert_close_rel(cpp.packed_matmul(*args), ref.packed_matmul(*args), TOL[dtype], f"{isa} {dtype}")


def test_avx2_fp32_from_three_rows_takes_the_exact_kernel(isa, gemv):
    """The default on the AVX2 form (docs/OPS.md): fp32 x on three digits for M <= 2, the exact kernel from M = 3
    (there the faster one; the 256-bit VNNI form too); on AVX-512 VNNI three digits for every M <= 32."""
    if isa in ("avx512vnni", "avx512") and not CPU_FLAGS:
        pytest.skip("no /proc/cpuinfo: cannot tell whether the VNNI kernel serves AVX-512 here")
    vnni = isa in ("avx512vnni", "avx512") and "avx512_vnni" in CPU_FLAGS
    gemv("auto")
    for m in (2, 4):
        args = case(96, 256, 2, 64, torch.float32, m, seed=m)
        auto = cpp.packed_matmul(*args)
        gemv("exact")
        exact = cpp.packed_matmul(*args)
        gemv("auto")
        assert torch.equal(auto, exact) == (m > 2 and not vnni), (isa, m)


def test_avx2vnni_cap_names_the_form_this_cpu_runs():
    """The avx2vnni cap selects the 256-bit VNNI form where the CPU has AVX-VNNI or AVX512_VNNI + VL (cpu_isa()
    names it from the same test the kernel choice makes), and the AVX2 form elsewhere; the avx2 cap never does."""
    if not CPU_FLAGS:
        pytest.skip("no /proc/cpuinfo: cannot tell which form this CPU has")
    has = ("avx_vnni" in CPU_FLAGS and cpp._C.built_with_avx_vnni) or ("avx512_vnni" in CPU_FLAGS
                                                                       and "avx512vl" in CPU_FLAGS)
    previous = cpp.cpu_isa()
    try:
        cpp.set_cpu_isa("avx2vnni")
        assert cpp.cpu_isa() == ("avx2vnni" if has else "avx2")
        cpp.set_cpu_isa("avx2")
        assert cpp.cpu_isa() == "avx2"
    finally:
        cpp.set_cpu_isa(previous)


@pytest.mark.parametrize("digits,bound", [(1, 3e-2), (2, 2e-4), (3, 2e-6)])
def test_error_shrinks_with_digits_and_exact_is_exact(isa, gemv, digits, bound):
    """What the digits cost, on activations with an outlier channel (a massive activation): the error bound is
    relative to the group's largest |x|, and the exact path stays at fp32 rounding."""
    k, n, bits = 512, 256, 2
    args = list(case(n, k, bits, 64, torch.float32, 4, seed=digits))
    args[0] = args[0].clone()
    args[0][:, 7] *= 50.0
    expected = ref.packed_matmul(*args)
    gemv(f"int8x{digits}")
    err = rel_err(cpp.packed_matmul(*args), expected)
    assert err < bound
    if digits < 3:  # an int8 digit does round: the test would notice if the path silently stayed exact
        assert err > 1e-7
    gemv("exact")
    assert rel_err(cpp.packed_matmul(*args), expected) < 1e-6


def test_non_finite_activations_propagate(gemv):
    gemv("auto")
    args = list(case(64, 128, 3, 64, torch.float32, 2, seed=3))
    args[0] = args[0].clone()
    args[0][1, 5] = float("nan")
    out = cpp.packed_matmul(*args)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


def test_zero_rows_and_zero_groups(gemv):
    gemv("auto")
    args = list(case(96, 256, 2, 64, torch.float32, 3, seed=4))
    args[0] = args[0].clone()
    args[0][0] = 0.0
    args[0][2, 64:128] = 0.0
    assert_close_rel(cpp.packed_matmul(*args), ref.packed_matmul(*args), TOL[torch.float32])


def test_quant_linear_with_lora_uses_the_same_path(gemv):
    gemv("auto")
    args = case(160, 192, 3, 64, torch.bfloat16, 4, seed=5)
    A = torch.randn(8, 192, generator=gen(6)) * 0.1
    B = torch.randn(160, 8, generator=gen(7)) * 0.1
    out = cpp.packed_linear(*args, A, B, 0.5)
    x = args[0]
    expected = ref.packed_matmul(*args) + (0.5 * ((x.float() @ A.t()) @ B.t())).to(torch.bfloat16)
    assert_close_rel(out, expected, TOL[torch.bfloat16])


def test_setting_names(gemv):
    for name in ("auto", "exact", "int8x1", "int8x2", "int8x3"):
        gemv(name)
        assert cpp.cpu_gemv() == name
    with pytest.raises(ValueError):
        cpp.set_cpu_gemv("int4")


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("m,n,k", [(1, 600, 256), (4, 600, 256), (7, 600, 256), (1, 1000, 1024), (4, 1000, 1024),
                                   (7, 1000, 1024), (32, 2100, 192)])
def test_blocks_of_whole_tiles_then_portable_tail(isa, gemv, m, bits, n, k):
    """A few wide blocks of whole register tiles (of unequal widths: 600 and 1000 are not multiples of the block
    count times the tile), then portable columns: every part written, and the same bits on one thread as on
    two (each column sums its groups in the same order whichever block and thread computes it). M = 32 over
    2100 columns: y is 269 KB, so even one thread splits the columns into blocks (kInt8BlockYBytes)."""
    gemv("auto")
    args = case(n, k, bits, 64, torch.bfloat16, m, seed=11 * m + bits + n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        poison_heap()
        one = cpp.packed_matmul(*args)
        torch.set_num_threads(2)
        poison_heap()
        two = cpp.packed_matmul(*args)
    finally:
        torch.set_num_threads(threads)
    assert_close_rel(two, ref.packed_matmul(*args), TOL[torch.bfloat16], f"{isa} m={m}")
    assert torch.equal(one, two)


def test_decode_digits_benchmark_smoke_run():
    """benchmarks/decode_digits_ppl.py on a tiny quantized model: every setting reads the same tokens one at a
    time; exact and three digits agree with the whole-sequence (prefill) pass to fp32 rounding, one digit does not."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_digits_ppl

    res = decode_digits_ppl.main(["--smoke", "--tokens", "12", "--threads", "1"])["results"]
    assert set(res) == {"exact", "auto", "int8x1", "int8x2", "int8x3", "prefill"}
    assert res["exact"]["max_log_prob_diff"] == 0.0
    assert res["prefill"]["max_log_prob_diff"] < 1e-4 and res["int8x3"]["max_log_prob_diff"] < 1e-4
    assert res["int8x1"]["max_log_prob_diff"] > 10 * res["int8x3"]["max_log_prob_diff"]


def test_decode_benchmark_smoke_run(tmp_path):
    """benchmarks/bench_cpu_decode.py on a small shape: a row per case, each with the copy and read bandwidths of
    its own rounds, every time positive, and the table written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_cpu_decode

    out = tmp_path / "decode.md"
    records = bench_cpu_decode.main(["--shapes", "48x256", "--bits", "2,3", "--ms", "1", "--threads", "1",
                                     "--sections", "decode", "--out", str(out)])
    rows = [r for r in records if "M" in r]
    assert [(r["N"], r["K"], r["bits"], r["M"]) for r in rows] == [(48, 256, 2, 1), (48, 256, 3, 1)]
    for r in rows:
        assert r["copy_gbs_same_rounds"] > 0 and r["read_gbs_same_rounds"] > 0 and r["read_s"] > 0
        assert min(r["exact_fp32_s"], r["int8x3_fp32_s"], r["int8x2_bf16_s"], r["linear_fp32_s"]) > 0
    assert out.read_text().count("| 48 x 256 |") == 2


def test_decode_ab_benchmark_smoke_run(tmp_path):
    """benchmarks/decode_ab.py with this tree as both builds, each on its own code path (--isa, --isa-after): one
    round of both, a row per case with a ratio, the two paths and the rows of x named."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.md"
    subprocess.run([sys.executable, str(root / "benchmarks" / "decode_ab.py"), str(root), str(root), "--rounds", "1",
                    "--calls", "2", "--shapes", "64x128,48x256", "--bits", "2,3", "--isa", "avx2", "--isa-after",
                    "avx2vnni", "--m", "3", "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    assert out.read_text().startswith("M = 3 packed_matmul")
    assert "cpu path avx2 (before) / avx2vnni (after)" in out.read_text()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "bit" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 64x128 2-bit", "| 64x128 3-bit", "| 48x256 2-bit",
                                                     "| 48x256 3-bit"]
    assert all(float(row.split(" | ")[3].rstrip(" |")) > 0 for row in rows)


def test_decode_ab_benchmark_times_the_layer_with_its_lora_factors(tmp_path):
    """--lora RANK times packed_linear (QuantLinear's forward) with LoRA factors of that rank, and says so."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.md"
    subprocess.run([sys.executable, str(root / "benchmarks" / "decode_ab.py"), str(root), str(root), "--rounds", "1",
                    "--calls", "2", "--shapes", "64x128", "--bits", "3", "--lora", "4", "--dtype", "bfloat16",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    assert out.read_text().startswith("M = 1 packed_linear (LoRA rank 4), bfloat16 x")
    assert any(line.startswith("| 64x128 3-bit |") for line in out.read_text().splitlines())


def test_decode_blocks_benchmark_smoke_run(tmp_path):
    """benchmarks/cpu_decode_blocks.py on shrunken blocks: a row per bit width and thread count, with the copy, both
    activation dtypes' times and the speedups, and the JSON records the same passes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, js = tmp_path / "blocks.md", tmp_path / "blocks.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_decode_blocks.py"), "--blocks", "2", "--bits", "2,3",
                    "--threads", "1", "--rounds", "1", "--shrink", "16", "--out", str(out), "--json", str(js)],
                   check=True, capture_output=True, text=True, timeout=300, cwd=root / "benchmarks")
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1 | ")]
    assert [row.split(" | ")[1] for row in rows] == ["2", "3"]
    records = json.loads(js.read_text())["records"]
    assert [(r["threads"], r["bits"], r["blocks"]) for r in records] == [(1, 2, 2), (1, 3, 2)]
    assert all(min(r["saliq_fp32_s"], r["saliq_bf16_s"], r["linear_fp32_s"], r["copy_gbs"]) > 0 for r in records)
    assert records[1]["saliq_fp32_bytes"] > records[0]["saliq_fp32_bytes"]  # 3-bit reads more than 2-bit


def test_gemv_cycles_tool_builds_and_runs(tmp_path):
    """benchmarks/cpu_gemv_cycles.cpp (`make gemv-cycles`) compiles against csrc/ as it is and times a case of each
    form the CPU has (it says so for a form the CPU lacks)."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    root = Path(__file__).resolve().parents[1]
    make = subprocess.run(["make", "-s", "-n", "-B", "build/cpu_gemv_cycles"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    compile_line = next(line for line in make.splitlines() if line.startswith("g++"))
    exe = tmp_path / "cpu_gemv_cycles"
    subprocess.run(compile_line.replace("-o build/cpu_gemv_cycles", f"-o {exe}").split(), cwd=root, check=True,
                   timeout=600)
    for form in ("avx2", "avx2vnni", "vnni", "novbmi", "mad"):
        out = subprocess.run([str(exe), form, "128", "256", "3", "3", "1", "3"], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        assert re.search(r"[0-9.]+ cycles per word row", out) or "lacks the form's extensions" in out, out
        if "cycles per word row" in out:
            assert re.search(r"activation digits [0-9.]+ us", out), out


def test_loop_mca_tool_finds_a_word_rows_loop():
    """benchmarks/cpu_loop_mca.py compiles a form as the build does and finds the M = 1 kernel's word-row loop: at
    2 bits and three digits the AVX2 form's has the 24 dot products of 16 columns x 16 inputs x 3 digits (32 byte
    products each), and no more."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("g++") is None or shutil.which("c++filt") is None:
        pytest.skip("no g++ / c++filt on this machine")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_loop_mca.py"), "avx2", "2", "3"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "word row of 16 columns" in out, out
    assert re.search(r"\b24 vpmaddubsw\b", out), out
    if shutil.which("llvm-mca"):
        assert re.search(r"llvm-mca -mcpu=znver3: [0-9.]+ cycles a word row", out), out


def test_loop_mca_table_counts_a_word_rows_bytes():
    """The table's bytes per word row of 16 columns (groups of 64, M = 1): 2-bit codes 64 bytes, 3-bit 96 with the
    hi plane, plus a quarter of a group's scales (fp32 with three digits, 16-bit with two) and int16 zero points;
    and the tool asks for a form when it is given neither one nor --table."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import cpu_loop_mca
    finally:
        sys.path.pop(0)
    assert [cpu_loop_mca.row_bytes(b, d) for b, d in ((2, 3), (2, 2), (3, 3), (3, 2), (4, 2))] == [88, 80, 120, 112,
                                                                                                   136]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_loop_mca.py")], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--table" in run.stderr


def test_read_patterns_tool_builds_and_runs(tmp_path):
    """benchmarks/cpu_read_patterns.cpp (`make read-patterns`) compiles and times its four read orders, and refuses
    a shape it cannot lay out, naming what it needs."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    if " avx2 " not in Path("/proc/cpuinfo").read_text().replace("\n", " ") + " ":
        pytest.skip("the tool reads with AVX2 loads")
    root = Path(__file__).resolve().parents[1]
    make = subprocess.run(["make", "-s", "-n", "-B", "build/cpu_read_patterns"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    compile_line = next(line for line in make.splitlines() if line.startswith("g++"))
    exe = tmp_path / "cpu_read_patterns"
    subprocess.run(compile_line.replace("-o build/cpu_read_patterns", f"-o {exe}").split(), cwd=root, check=True,
                   timeout=300)
    out = subprocess.run([str(exe), "256", "512", "2", "3"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    rows = re.findall(r"^  (\S.*?) +([0-9.]+) ms +([0-9.]+) GB/s", out, flags=re.M)
    assert [name for name, _, _ in rows] == ["sequential", "v1 panels", "v1 + prefetch", "panel order"], out
    assert all(float(ms) > 0 and float(gbs) > 0 for _, ms, gbs in rows), out
    bad = subprocess.run([str(exe), "100", "512", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "N must be a positive multiple of 64" in bad.stderr


def test_instruction_mix_tool_runs_a_mix():
    """benchmarks/cpu_instruction_mix.py compiles and times a mix given on the command line (or says the CPU lacks
    the extensions), and names a bad mix item."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    tool = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_instruction_mix.py"
    out = subprocess.run([sys.executable, str(tool), "dpbusd=4", "and=2"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert re.fullmatch(r"4 dpbusd, 2 and: [0-9.]+ cycles per iteration\n", out) or "lacks" in out, out
    out = subprocess.run([sys.executable, str(tool), "varshift=2", "permps=2", "cvtbf16=1", "store=1"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert re.fullmatch(r"2 varshift, 2 permps, 1 cvtbf16, 1 store: [0-9.]+ cycles per iteration\n", out) or \
        "lacks" in out, out
    bad = subprocess.run([sys.executable, str(tool), "dpbusd=x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "dpbusd=x" in bad.stderr
