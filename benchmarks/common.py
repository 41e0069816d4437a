"""Helpers of the benchmarks and the GPU report: device set-up, timing, the device's measured copy bandwidth and
fp16 matmul rate, byte floors, operands copied past the L2, the eager ApiQ-style composite, and result files; for
the CPU suites their fixture body (thread count, copy bandwidth, timed cases), table header and result files.

Importing this module selects the Triton interpreter when there is no GPU (before any kernel is imported).
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_GPU else "cpu"
RESULTS = Path(__file__).resolve().parent / "results"

# LLaMA-2-7B linear shapes as [out_features N, in_features K]: q/k/v/o, down, gate/up
LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def sync() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 30, flush_l2: bool = True) -> float:
    """Median milliseconds of fn(). On a GPU: CUDA events, with the L2 cache flushed before each run so a
    memory-bound kernel is timed reading from DRAM; on the CPU: a wall clock (the interpreter: meaningless
    for speed, useful for smoke runs only)."""
    if not HAS_GPU:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from saliq.kernels.autotune import cuda_time_ms

    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    return cuda_time_ms(fn, warmup, rep, before_each=None if flush is None else flush.zero_)


def l2_bytes() -> int:
    """The GPU's L2 cache size (a nominal 64 MiB without a GPU)."""
    if not HAS_GPU:
        return 64 << 20
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20))


def cpu_cache_flush_bytes(floor: int = 64 << 20) -> int:
    """Bytes to stream on the CPU before a timed call so that it reads its operands from DRAM: twice the largest
    cache this CPU reports (Linux sysfs), at least `floor`."""
    largest = 0
    for size in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = Path(size).read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return max(floor, 2 * largest)


def copies_beyond_l2(nbytes_one: int, factor: float = 3.0) -> int:
    """How many copies of an operand of nbytes_one bytes, read in turn, keep every read coming from DRAM:
    together they exceed `factor` times the L2 (one without a GPU: smoke runs time nothing)."""
    if not HAS_GPU:
        return 1
    return max(1, -(-int(factor * l2_bytes()) // max(int(nbytes_one), 1)))


def packed_args_beyond_l2(p, bits: int, group_size: int, in_features: int) -> list[tuple]:
    """The packed ops' arguments after x for PackedWeight p, (qweight, qweight_hi, scales, zeros, bits, group,
    K), and copies with clones of its tensors: together more than the L2 (copies_beyond_l2), to be read in turn."""
    tail = (bits, group_size, in_features)
    return [(p.qweight, p.qweight_hi, p.scales, p.zeros, *tail)] + [
        (p.qweight.clone(), p.qweight_hi.clone(), p.scales.clone(), p.zeros.clone(), *tail)
        for _ in range(copies_beyond_l2(p.nbytes()) - 1)]


def tensor_beyond_l2(t: torch.Tensor) -> list[torch.Tensor]:
    """t and clones of it, together more than the L2 (copies_beyond_l2), to be read in turn."""
    return [t] + [t.clone() for _ in range(copies_beyond_l2(nbytes(t)) - 1)]


def graph_time_ms(calls: list[Callable[[], object]], replays: int = 10, rounds: int = 5) -> float:
    """Milliseconds per call of a sequence of calls captured in one CUDA graph and replayed: no launch
    gaps and no Python between kernels, as a decode loop under CUDA graphs runs. Give each call its own copy
    of the large operand (copies_beyond_l2) so every call reads DRAM. Median of `rounds` timings of
    `replays` replays. Without a GPU: the eager calls on a wall clock (smoke runs only)."""
    if not HAS_GPU:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e3 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: kernel choices, first-call allocations
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(calls)))
    del graph
    times.sort()
    return times[len(times) // 2]


CPU_COPY_BYTES = 256 << 20  # the CPU copy that measures bandwidth


def copy_bandwidth_gbs(nbytes: Optional[int] = None, rounds: int = 7) -> float:
    """Measured copy bandwidth on DEVICE (bytes read + bytes written per second), GB/s: the ceiling of a
    weight-streaming op. On a GPU a 1 GiB device-to-device copy timed with CUDA events; on the CPU a 256 MiB copy,
    the best of `rounds` wall-clock runs (one run on a shared machine varies by up to 2x)."""
    if HAS_GPU:
        nbytes = nbytes or 1 << 30
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), flush_l2=False)
        return 2 * nbytes / (ms * 1e-3) / 1e9
    src = torch.empty((nbytes or CPU_COPY_BYTES) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def fp16_matmul_tflops(n: int = 8192) -> float:
    """Measured dense fp16 matmul rate (fp32 accumulation), TFLOP/s."""
    dtype = torch.float16 if HAS_GPU else torch.float32
    n = n if HAS_GPU else 256
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = time_ms(lambda: a @ b, flush_l2=False)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_GPU else f"cpu-{platform.machine()}-interpreter"


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------- inputs
def random_packed(n: int, k: int, bits: int, group_size: int, dtype=torch.float16, with_weight: bool = False,
                  device=None, generator=None):
    """A random PackedWeight (zero points partly outside [0, Q], as LWC produces them) on `device` (DEVICE when
    None), drawn from `generator` when given. with_weight: also the fp32 W = (q - z) * s it encodes, computed
    here from the levels (not by any saliq op), to check results against."""
    from saliq import packing
    from saliq.spec import QuantSpec

    device = DEVICE if device is None else device
    g = k if group_size == -1 else group_size
    q = torch.randint(0, 2**bits, (n, k), device=device, generator=generator)
    s = torch.rand(n, k // g, device=device, generator=generator) * 0.02 + 0.001
    z = torch.randint(-1, 2**bits + 1, (n, k // g), device=device, generator=generator).float()
    packed = packing.pack_weight(q, s, z, QuantSpec(bits=bits, group_size=group_size), dtype=dtype)
    if not with_weight:
        return packed
    s_stored = s.to(dtype).float()  # the scales as stored
    W = ((q.float().reshape(n, -1, g) - z[..., None]) * s_stored[..., None]).reshape(n, k)
    return packed, W


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected|| in fp64."""
    out, expected = out.detach().double(), expected.detach().double()
    return float((out - expected).norm() / expected.norm().clamp_min(1e-30))


def lwc_inputs(n: int, k: int, group_size: int, dtype=torch.float16):
    g = k if group_size == -1 else group_size
    W = (torch.randn(n, k, device=DEVICE) * 0.02).to(dtype)
    hi = torch.full((n, k // g), 4.0, device=DEVICE) + torch.randn(n, k // g, device=DEVICE) * 0.5
    lo = torch.full((n, k // g), 4.0, device=DEVICE) + torch.randn(n, k // g, device=DEVICE) * 0.5
    S = torch.rand(n, k, device=DEVICE).to(dtype)
    return W, hi, lo, S


# ---------------------------------------------------------------- the eager composite ApiQ / OmniQuant write
def _round_ste(x):
    return (x.round() - x).detach() + x


def apiq_fake_quant(W, hi, lo, bits: int, group_size: int, S: Optional[torch.Tensor] = None):
    """LWC fake quantization as ApiQ / OmniQuant write it (round_ste and autograd), plus the saliency
    penalty sum S (What - W)^2 when S is given. Returns (What, reg)."""
    n, k = W.shape
    g = k if group_size == -1 else group_size
    x = W.reshape(-1, g)
    xmax = torch.sigmoid(hi.reshape(-1, 1)) * x.amax(-1, keepdim=True)
    xmin = torch.sigmoid(lo.reshape(-1, 1)) * x.amin(-1, keepdim=True)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=1e-5, max=1e4)
    zero = (-xmin / scale).clamp(min=-1e4, max=1e4).round()
    q = (_round_ste(x / scale) + zero).clamp(0, 2**bits - 1)
    what = ((q - zero) * scale).reshape(n, k)
    reg = None if S is None else (S * (what - W) ** 2).sum()
    return what, reg


# ---------------------------------------------------------------- results
def write_results(records: list[dict], meta: dict, table: str, stem: Optional[str] = None,
                  directory: Optional[Path] = None) -> tuple[Path, Path]:
    """<directory, default benchmarks/results>/<date>-<device>.json and .md."""
    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = stem or f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', meta.get('device', 'device')).strip('-').lower()}"
    jpath, mpath = directory / f"{stem}.json", directory / f"{stem}.md"
    jpath.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    mpath.write_text(table)
    return jpath, mpath


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_uncaptured(request, text):
    """Print the summary table past pytest's output capture."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print("\n" + text)
        return
    with capman.global_and_fixture_disabled():
        print("\n" + text, flush=True)


@contextlib.contextmanager
def cpu_bench_threads():
    """torch on SALIQ_BENCH_THREADS threads inside the block (unset or 0: as it is), restored after; yields a list that
    holds, once the block ends, the thread count the cases ran on."""
    before = torch.get_num_threads()
    wanted = int(os.environ.get("SALIQ_BENCH_THREADS", "0"))
    if wanted:
        torch.set_num_threads(wanted)
    ran_on: list = []
    try:
        yield ran_on
    finally:
        ran_on.append(torch.get_num_threads())
        torch.set_num_threads(before)


def cpu_bench_session(results: dict):
    """The body of a CPU suite's module fixture around its cases: the thread count set (cpu_bench_threads) and
    the copy bandwidth measured into results["copy_gbs"]. Use `threads, cases = yield from
    cpu_bench_session(RESULTS)`: after the suite, the thread count the cases ran on and the timed cases (tuple
    keys; skipped cases hold None)."""
    with cpu_bench_threads() as ran_on:
        results["copy_gbs"] = copy_bandwidth_gbs()
        yield
    return ran_on[0], {k: v for k, v in results.items() if isinstance(k, tuple) and v is not None}


def write_bench_results(stem: str, text: str, payload: dict) -> None:
    """A CPU benchmark's table and data as STEM.md and STEM.json in SALIQ_BENCH_RESULTS (default
    benchmarks/results)."""
    out_dir = os.environ.get("SALIQ_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(payload, f, indent=1)


def write_report_files(text: str, payload, md_path: Optional[str], json_path: Optional[str]) -> None:
    """A script's table to md_path and its data to json_path, each where given (--out, --json)."""
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (a VM may name only the vendor: "AMD EPYC",
    family 25 a Zen 3 / Zen 4, 26 a Zen 5); the architecture where that file is missing."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's block is enough
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def cpu_bench_header(title: str, threads: int, copy_gbs: float) -> str:
    """The first line of a CPU benchmark's table: what ran, when, on which CPU, threads and OpenMP waiting, saliq's
    SIMD path, and the copy bandwidth the shares divide by."""
    from saliq import cpp_backend as cpp

    return (f"CPU {title}, {datetime.date.today()}, {cpu_model()}, {threads} threads "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), cpu path {cpp.cpu_isa()}, copy "
            f"bandwidth {copy_gbs:.1f} GB/s")


def cpu_bench_payload(threads: int, copy_gbs: float, **fields) -> dict:
    """The JSON of a CPU benchmark: the header's facts, then `fields`."""
    from saliq import cpp_backend as cpp

    return {"date": str(datetime.date.today()), "threads": threads, "cpu_path": cpp.cpu_isa(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "copy_gbs": copy_gbs, **fields}
