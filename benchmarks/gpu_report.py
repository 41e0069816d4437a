"""GPU report: saliq's kernels against fp16 F.linear, the eager reference, torch.compile and the device's
measured copy bandwidth; the end-to-end decode of a LLaMA-2-7B-shaped model; every bar marked met or not.

Sections (one JSON record per case, `op` names the section):
- `packed_linear`, decode sizes M = 1, 4, 16: the default kernel (the registry's table, saliq/regimes.py) and
  fp16 F.linear on the dequantized weight, both captured in CUDA graphs and fed rotating weight copies larger
  than the L2 (so every call reads DRAM, as a decode step does), plus the eager reference, torch.compile of it
  (a subset: compiling costs seconds) and the eager per-call time of the default path (Python included);
- `packed_linear`, prefill sizes M = 256, 4096: the default path against fp16 F.linear, L2 flushed per call
  (x_fp16), and both graph-timed with weights rotated past the L2 (x_fp16_graph: the GPU's time alone);
- `dequantize`: the prefill's decode of W into the activation dtype, every Triton configuration against the
  CUDA kernel (x_triton = best Triton time / CUDA time), each checked bit for bit against ref;
- `lora`: the LoRA term's cost on a decode call (QuantLinear with and without r = 64);
- `decode`: benchmarks/decode_e2e.py, tokens/s of the whole model with CUDA graphs against fp16;
- `fake_quant_fwd_bwd`: the fused fake quantization with the saliency term, forward + backward, against the
  ApiQ-style eager composite and its torch.compile version, fp32 / fp16 / bf16;
- `calibration`: benchmarks/calib_bench.py, one LLaMA-2-7B-shaped block calibrated with the default backends
  against the eager `ref`, and the projected time of whole 7B / 13B / 70B models at ApiQ's budget;
- `sparse_addmm`: the reserved weights of issue 14 (CSR, 0.5% density) per backend, graph-timed with the CSR rotated
  past the L2, next to the default 2-bit g64 packed GEMV they follow (x_gemv = GEMV time / sparse time), and
  `fused`: added inside the decode kernel's launch (ms = its extra time over the plain GEMV);
- `target`: the bars of the issues, met or not.

    python benchmarks/gpu_report.py              # on a GPU, a few minutes
    python benchmarks/gpu_report.py --quick      # 2-bit prefill and end-to-end only, no torch.compile, no fake quant
    python benchmarks/gpu_report.py --smoke      # tiny shapes on the CPU: checks the script, times nothing
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import common
from common import (DEVICE, HAS_GPU, apiq_fake_quant, copies_beyond_l2, copy_bandwidth_gbs, device_name,
                    fp16_matmul_tflops, graph_time_ms, lwc_inputs, markdown_table, nbytes, packed_args_beyond_l2,
                    random_packed, tensor_beyond_l2, time_ms)

DECODE_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # [N, K]
PREFILL_SHAPES = [(4096, 11008), (11008, 4096)]
COMPILE_CASES = {(4096, 11008, 2, 1), (4096, 11008, 2, 16)}  # (N, K, bits, M) with a torch.compile baseline

# (name, selector of records, field, bar): the issues' bars
BARS = [
    ("M=1 2-bit 4096x11008: x fp16", dict(op="packed_linear", N=4096, K=11008, bits=2, group=64, M=1), "x_fp16", 4.0),
    ("M=1 2-bit 11008x4096: x fp16", dict(op="packed_linear", N=11008, K=4096, bits=2, group=64, M=1), "x_fp16", 4.0),
    ("M=1 2-bit 8192x28672: x fp16", dict(op="packed_linear", N=8192, K=28672, bits=2, group=64, M=1), "x_fp16", 5.0),
    ("M=1 2-bit 8192x28672: % copy bandwidth", dict(op="packed_linear", N=8192, K=28672, bits=2, group=64, M=1),
     "pct_bw", 75.0),
    ("M=1 3-bit 8192x28672: x fp16", dict(op="packed_linear", N=8192, K=28672, bits=3, group=64, M=1), "x_fp16", 3.6),
    ("M=1 4-bit 8192x28672: x fp16", dict(op="packed_linear", N=8192, K=28672, bits=4, group=64, M=1), "x_fp16", 3.0),
    ("M=16 2-bit 8192x28672: x fp16", dict(op="packed_linear", N=8192, K=28672, bits=2, group=64, M=16), "x_fp16",
     3.0),
] + [
    (f"M={m} {bits}-bit {n}x{k}: x fp16", dict(op="packed_linear", N=n, K=k, bits=bits, group=64, M=m), "x_fp16",
     0.9 if m == 256 else 0.95)
    for m in (256, 4096) for (n, k) in PREFILL_SHAPES for bits in (2, 3, 4)
] + [
    ("decode 7B-shaped, batch 1, 2-bit: x fp16 tokens/s", dict(op="decode", bits=2, M=1), "x_fp16", 3.0),
] + [
    (f"fake-quant fwd+bwd 4096x11008 2-bit {dt}: % copy bandwidth",
     dict(op="fake_quant_fwd_bwd", N=4096, K=11008, bits=2, dtype=dt), "pct_bw", 85.0)
    for dt in ("float32", "float16", "bfloat16")
] + [
    (f"fake-quant fwd+bwd 4096x11008 2-bit {dt}: x torch.compile",
     dict(op="fake_quant_fwd_bwd", N=4096, K=11008, bits=2, dtype=dt), "x_compile", 2.5)
    for dt in ("float32", "float16", "bfloat16")
] + [
    ("calibration, 7B-shaped block: x eager", dict(op="calibration"), "x_eager", 2.0),
    ("calibration, 7B-shaped block, training epochs: x eager", dict(op="calibration"), "x_eager_train", 2.0),
] + [
    # the reserved weights (issue 14) at 0.5% density cost under 15% of the packed GEMV they follow
    (f"sparse_addmm 0.5% {n}x{k} M=1 ({b}): GEMV time / sparse time",
     dict(op="sparse_addmm", N=n, K=k, M=1, backend=b), "x_gemv", 1 / 0.15)
    for (n, k) in PREFILL_SHAPES for b in ("triton", "cuda", "fused")
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _safe(fn: Callable[[], float]) -> Optional[float]:
    try:
        return fn()
    except Exception as exc:  # a baseline that fails (e.g. torch.compile) is reported, not fatal
        log(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        return None


def _ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def _rel_err(y, y_ref) -> float:
    y, y_ref = y.double(), y_ref.double()
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30))


def _compiled(fn):
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one graph per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    return torch.compile(fn, dynamic=False)


def _default_impl(x, args):
    """The implementation the registry runs for this call (the regime table on CUDA) and its backend name."""
    from saliq import backends

    full = (x, *args, None)
    impl = backends.resolve("packed_matmul", x.device.type, *full)
    name = next((b for b in backends.BACKENDS if backends._impls[b].get("packed_matmul") is impl), "?")
    return impl, name


# ------------------------------------------------------------------------------------------------ packed_linear
def bench_decode(shapes, bits_list, groups, ms_list, dtype, bw, compile_baselines) -> list[dict]:
    from saliq import ref

    compiled_ref = _compiled(ref.packed_matmul) if compile_baselines else None
    rows = []
    for n, k in shapes:
        for bits in bits_list:
            for g in groups:
                if g != 64 and (n, k) != (4096, 11008):
                    continue
                p0 = random_packed(n, k, bits, g, dtype)
                args_of = packed_args_beyond_l2(p0, bits, g, k)
                W16 = ref.dequantize(*args_of[0]).to(dtype)
                w16_copies = tensor_beyond_l2(W16)
                for M in ms_list:
                    log(f"packed_linear {n}x{k} {bits}-bit g{g} M={M} {str(dtype)[6:]}")
                    x = torch.randn(M, k, device=DEVICE, dtype=dtype)
                    impl, backend = _default_impl(x, args_of[0])
                    y = impl(x, *args_of[0], None)
                    err = _rel_err(y, ref.packed_matmul(x.float(), *args_of[0][:2], args_of[0][2].float(),
                                                        *args_of[0][3:], None))
                    t = graph_time_ms([(lambda a=a: impl(x, *a, None)) for a in args_of])
                    t16 = graph_time_ms([(lambda w=w: F.linear(x, w)) for w in w16_copies])
                    t_call = time_ms(lambda: impl(x, *args_of[0], None))
                    t_eager = _safe(lambda: time_ms(lambda: ref.packed_matmul(x, *args_of[0], None), rep=10))
                    t_comp = None
                    if compiled_ref is not None and (n, k, bits, M) in COMPILE_CASES and g == 64:
                        t_comp = _safe(lambda: graph_time_ms(
                            [(lambda a=a: compiled_ref(x, *a, None)) for a in args_of]))
                    moved = p0.nbytes() + nbytes(x) + M * n * x.element_size()
                    gbs = moved / (t * 1e-3) / 1e9
                    rows.append(dict(
                        op="packed_linear", N=n, K=k, bits=bits, group=g, M=M, dtype=str(dtype)[6:], backend=backend,
                        ms=t, ms_fp16=t16, ms_eager=t_eager, ms_compile=t_comp, us_call=1e3 * t_call,
                        x_fp16=_ratio(t16, t), x_eager=_ratio(t_eager, t), x_compile=_ratio(t_comp, t),
                        gbs=gbs, pct_bw=100 * gbs / bw, ideal_x_fp16=16 / (8 * p0.nbytes() / (n * k)), err=err,
                        timing="cuda graph, weights rotated past L2"))
                del w16_copies, args_of
                torch.cuda.empty_cache() if HAS_GPU else None
    return rows


def _g64_weights(shapes, bits_list, dtype):
    """Per shape and bit width a random packed g64 weight: (n, k, bits, p, args), args what the ops take after x."""
    for n, k in shapes:
        for bits in bits_list:
            p = random_packed(n, k, bits, 64, dtype)
            yield n, k, bits, p, (p.qweight, p.qweight_hi, p.scales, p.zeros, bits, 64, k)


def bench_prefill(shapes, bits_list, ms_list, dtype, bw) -> list[dict]:
    from saliq import ref

    rows = []
    for n, k, bits, p, args in _g64_weights(shapes, bits_list, dtype):
        W16 = ref.dequantize(*args).to(dtype)
        for M in ms_list:
            log(f"packed_linear {n}x{k} {bits}-bit g64 M={M} {str(dtype)[6:]}")
            x = torch.randn(M, k, device=DEVICE, dtype=dtype)
            impl, backend = _default_impl(x, args)
            y = impl(x, *args, None)  # the first call of a bucket may tune: keep it out of the timing
            err = _rel_err(y, ref.packed_matmul(x.float(), *args[:2], args[2].float(), *args[3:], None))
            t = time_ms(lambda: impl(x, *args, None))
            t16 = time_ms(lambda: F.linear(x, W16))
            tg, tg16 = _prefill_graph_ms(impl, x, p, args, W16)
            rows.append(dict(
                op="packed_linear", N=n, K=k, bits=bits, group=64, M=M, dtype=str(dtype)[6:], backend=backend,
                ms=t, ms_fp16=t16, x_fp16=_ratio(t16, t), tflops=2 * M * n * k / (t * 1e-3) / 1e12,
                tflops_fp16=2 * M * n * k / (t16 * 1e-3) / 1e12, err=err, config=_triton_config(x, p),
                timing="CUDA events, L2 flushed", ms_graph=tg, ms_fp16_graph=tg16,
                x_fp16_graph=None if tg is None else _ratio(tg16, tg)))
    return rows


def _prefill_graph_ms(impl, x, p, args, W16):
    """The prefill call and fp16 F.linear graph-timed as the decode rows are (weights rotated past the L2): the
    GPU's time without the host's, which the eager timing counts whenever the GPU drains after the flush (a
    Python-heavy path looks slower there than inside a model's forward, whose kernels queue up). (None, None)
    when the path cannot be captured."""
    try:
        packed = packed_args_beyond_l2(p, *args[4:])
        dense = tensor_beyond_l2(W16)
        tg = graph_time_ms([(lambda a=a: impl(x, *a, None)) for a in packed], replays=3, rounds=3)
        tg16 = graph_time_ms([(lambda w=w: F.linear(x, w)) for w in dense], replays=3, rounds=3)
        return tg, tg16
    except RuntimeError as e:  # a capture the path does not allow: keep the eager figures
        log(f"  prefill not graph-timed: {e}")
        return None, None


def bench_dequantize(shapes, bits_list, dtype, bw) -> list[dict]:
    """The prefill's first half: W [N, K] decoded into the activation dtype, L2 flushed per call. Every
    Triton configuration and the CUDA kernel (csrc/cuda/dequantize.cu), each checked bit for bit against
    ref; pct_bw counts the packed bytes read and W written."""
    from saliq import ref
    from saliq.kernels import dequantize as tdq

    rows = []
    for n, k, bits, p, args in _g64_weights(shapes, bits_list, dtype):
        expected = ref.dequantize(*args).to(dtype)
        out = torch.empty(n, k, device=DEVICE, dtype=dtype)
        moved = nbytes(p.qweight, p.qweight_hi, p.scales, p.zeros, out)
        log(f"dequantize {n}x{k} {bits}-bit g64 {str(dtype)[6:]}")
        times = {}
        for cfg in tdq.candidates_for(out):  # the CUDA kernel on a GPU, then every Triton configuration
            label = ",".join(f"{a}={b}" for a, b in sorted(cfg.items()))
            name = "cuda" if cfg.get("kind") == "cuda" else f"triton {label}"
            fn = lambda cfg=cfg: tdq.run_config(cfg, out, *args)  # noqa: E731
            out.fill_(float("nan"))
            fn()
            if not torch.equal(out, expected):
                log(f"  {name}: differs from ref.dequantize")
                continue
            times[name] = time_ms(fn)
        best_triton = min((t for name, t in times.items() if name.startswith("triton")), default=None)
        rows.append(dict(op="dequantize", N=n, K=k, bits=bits, group=64, dtype=str(dtype)[6:],
                         ms_triton=best_triton, ms_cuda=times.get("cuda"),
                         x_triton=_ratio(best_triton, times.get("cuda")),
                         pct_bw=None if not times else 100 * moved / (min(times.values()) * 1e-3) / (bw * 1e9),
                         timing="CUDA events, L2 flushed"))
    return rows


def _triton_config(x, p) -> Optional[str]:
    if not HAS_GPU:
        return None
    from saliq.kernels import autotune

    key = (p.bits, p.group_size, p.out_features, p.in_features, str(x.dtype).replace("torch.", ""),
           autotune.m_bucket(x.shape[0]), False)
    cfg = autotune.lookup("packed_matmul", key, x.device)
    return None if cfg is None else ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def bench_lora(dtype) -> list[dict]:
    """Cost of QuantLinear's LoRA term (r = 64) on a decode call, graph-timed."""
    from saliq.nn import QuantLinear
    from saliq.spec import QuantSpec

    n, k, r = (4096, 11008, 64) if HAS_GPU else (64, 256, 8)
    rows = []
    for M in (1, 16):
        x = torch.randn(M, k, device=DEVICE, dtype=dtype)
        times = {}
        for rank in (0, r):
            layers = []
            for _ in range(copies_beyond_l2(n * k * 5 // 16)):
                p = random_packed(n, k, 2, 64, dtype)
                A = torch.randn(rank, k, device=DEVICE, dtype=dtype) * 0.01 if rank else None
                B = torch.randn(n, rank, device=DEVICE, dtype=dtype) * 0.01 if rank else None
                layers.append(QuantLinear(p, None, A, B, 16.0, QuantSpec(bits=2, group_size=64)))
            with torch.no_grad():
                times[rank] = graph_time_ms([(lambda layer=layer: layer(x)) for layer in layers])
        rows.append(dict(op="lora", N=n, K=k, bits=2, group=64, M=M, dtype=str(dtype)[6:], rank=r, ms=times[r],
                         ms_no_lora=times[0], lora_overhead_pct=100 * (times[r] / times[0] - 1)))
    return rows


# ------------------------------------------------------------------------------------------------ fake quant
def bench_fake_quant(shapes, bits_list, dtypes, bw, compile_baselines) -> list[dict]:
    from saliq import backends

    compiled = _compiled(apiq_fake_quant) if compile_baselines else None
    rows = []
    g = 64
    for n, k in shapes:
        for bits in bits_list:
            for dtype in dtypes:
                W, hi, lo, S = lwc_inputs(n, k, g, dtype)
                grad = torch.randn_like(W)
                greg = torch.tensor(0.1, device=DEVICE)
                log(f"fake_quant fwd+bwd {n}x{k} {bits}-bit g{g} {str(dtype)[6:]}")

                def step_of(name):
                    fwd = backends._impls[name]["fake_quant_lwc_fwd"]
                    bwd = backends._impls[name]["fake_quant_lwc_bwd"]

                    def step():
                        fwd(W, hi, lo, S, None, bits, g, False)
                        bwd(grad, greg, W, hi, lo, S, None, bits, g, False, False)
                    return step

                def composite_step(fn):
                    hi_, lo_ = hi.detach().requires_grad_(), lo.detach().requires_grad_()

                    def step():
                        what, reg = fn(W, hi_, lo_, bits, g, S)
                        torch.autograd.grad([what, reg], [hi_, lo_], [grad, greg])
                    return step

                per_backend = {name: _safe(lambda name=name: time_ms(step_of(name)))
                               for name in ("triton", "cuda") if name in backends.available("fake_quant_lwc_fwd",
                                                                                            W.device.type)}
                best_name = min((b for b in per_backend if per_backend[b] is not None),
                                key=lambda b: per_backend[b], default=None)
                t = per_backend.get(best_name)
                t_eager = _safe(lambda: time_ms(composite_step(apiq_fake_quant), rep=10))
                t_comp = None if compiled is None else _safe(lambda: time_ms(composite_step(compiled), rep=10))
                # floor: forward reads W, S and writes What; backward reads the gradient, W and S
                moved = 3 * nbytes(W) + 2 * nbytes(S) + nbytes(grad) + 16 * hi.numel()
                rows.append(dict(op="fake_quant_fwd_bwd", N=n, K=k, bits=bits, group=g, M=None,
                                 dtype=str(dtype)[6:], backend=best_name, ms=t,
                                 ms_triton=per_backend.get("triton"), ms_cuda=per_backend.get("cuda"),
                                 ms_eager=t_eager, ms_compile=t_comp,
                                 pct_bw=None if t is None else 100 * moved / (t * 1e-3) / 1e9 / bw,
                                 x_eager=_ratio(t_eager, t), x_compile=_ratio(t_comp, t)))
    return rows


# ------------------------------------------------------------------------------------------------ bars
# ------------------------------------------------------------------------------------------------ sparse_addmm
def bench_sparse(shapes, ms_list, dtype, bw, density: float = 0.005) -> list[dict]:
    """sparse_addmm at `density` in every backend that runs here, writing into a fixed buffer (as inference adds
    into the GEMV's output), against the default 2-bit g64 packed GEMV of the same layer; both graph-timed with
    their operands rotated past the L2."""
    from saliq import backends, ref

    rows = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(n + k)
        nnz = max(1, int(n * k * density))
        flat = torch.randperm(n * k, generator=g)[:nnz].sort().values
        counts = torch.bincount(flat // k, minlength=n)
        rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
        csr0 = tuple(t.to(DEVICE) for t in (rowptr, (flat % k).int(), torch.randn(nnz, generator=g) * 0.02))
        csr_bytes = 8 * nnz + 4 * (n + 1)
        csrs = [csr0] + [tuple(t.clone() for t in csr0) for _ in range(copies_beyond_l2(csr_bytes) - 1)]
        p0 = random_packed(n, k, 2, 64, dtype)
        pargs = packed_args_beyond_l2(p0, 2, 64, k)
        for M in ms_list:
            log(f"sparse_addmm {n}x{k} {100 * density:g}% M={M} {str(dtype)[6:]}")
            x = torch.randn(M, k, device=DEVICE, dtype=dtype)
            y = torch.randn(M, n, device=DEVICE, dtype=dtype)
            gemv, _ = _default_impl(x, pargs[0])
            t_gemv = graph_time_ms([(lambda a=a: gemv(x, *a, None)) for a in pargs])
            expected = ref.sparse_addmm(y, x, *csr0)
            for backend in [b for b in ("triton", "cuda", "cpp") if b in backends.available("sparse_addmm", DEVICE)]:
                fn = backends._impls[backend]["sparse_addmm"]
                err = _rel_err(fn(y, x, *csr0), expected)
                out = torch.empty_like(y)
                t = graph_time_ms([(lambda c=c: fn.into(y, x, *c, out)) for c in csrs])
                gbs = (csr_bytes + nbytes(x) + 2 * M * n * x.element_size()) / (t * 1e-3) / 1e9
                rows.append(dict(op="sparse_addmm", N=n, K=k, bits=2, group=64, M=M, dtype=str(dtype)[6:],
                                 backend=backend, density=density, nnz=nnz, ms=t, ms_gemv=t_gemv,
                                 pct_of_gemv=100 * t / t_gemv, x_gemv=_ratio(t_gemv, t), gbs=gbs, pct_bw=100 * gbs / bw,
                                 err=err, timing="cuda graph, CSR and weights rotated past L2"))
            extras = getattr(gemv, "with_extras", None)
            fused = None if extras is None else (lambda x_, *a: extras(x_, *a[:8], None, None, 0.0, *a[8:]))
            if fused is not None and fused(x, *pargs[0], None, *csr0) is not None:
                # inside the decode kernel's launch: its extra time over the plain GEMV is the sparse part's cost
                want = ref.sparse_addmm(ref.packed_matmul(x.float(), *pargs[0][:2], pargs[0][2].float(),
                                                          *pargs[0][3:], None), x, *csr0)
                err = _rel_err(fused(x, *pargs[0], None, *csr0), want)
                t_fused = graph_time_ms([(lambda a=a, c=c: fused(x, *a, None, *c)) for a, c in zip(pargs, csrs)])
                extra = max(t_fused - t_gemv, 1e-6)
                rows.append(dict(op="sparse_addmm", N=n, K=k, bits=2, group=64, M=M, dtype=str(dtype)[6:],
                                 backend="fused", density=density, nnz=nnz, ms=extra, ms_gemv=t_gemv,
                                 ms_fused=t_fused, pct_of_gemv=100 * extra / t_gemv, x_gemv=t_gemv / extra,
                                 err=err, timing="cuda graph, CSR and weights rotated past L2; ms = fused - GEMV"))
        del csrs, pargs
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    out = []
    for name, sel, field, bar in BARS:
        hits = [r for r in rows if all(r.get(k) == v for k, v in sel.items())]
        value = hits[0].get(field) if hits else None
        out.append(dict(target=name, value=value, required=f">= {bar}", met=None if value is None else value >= bar))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under the interpreter")
    ap.add_argument("--quick", action="store_true",
                    help="2-bit prefill and end-to-end only, no torch.compile, no fake quant")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode")
    ap.add_argument("--sections", nargs="+",
                    default=["decode", "prefill", "dequant", "lora", "e2e", "fq", "calib", "sparse"],
                    help="which sections to run (decode prefill dequant lora e2e fq calib sparse)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    args = ap.parse_args(argv)
    if not HAS_GPU and not args.smoke:
        log("gpu_report needs a CUDA GPU: not run (use --smoke for a CPU check of the script itself)")
        return 2
    started = time.perf_counter()
    dtype = torch.float16 if HAS_GPU else torch.float32
    if args.smoke:
        decode_shapes, prefill_shapes, decode_ms, prefill_ms = [(64, 256), (37, 128)], [(64, 256)], [1, 4], [33]
    elif args.quick:
        decode_shapes, prefill_shapes, decode_ms, prefill_ms = DECODE_SHAPES[1:], PREFILL_SHAPES, [1, 16], [256, 4096]
    else:
        decode_shapes, prefill_shapes, decode_ms, prefill_ms = DECODE_SHAPES, PREFILL_SHAPES, [1, 4, 16], [256, 4096]
    compile_baselines = not (args.no_compile or args.smoke or args.quick)

    import triton

    bw = copy_bandwidth_gbs() if HAS_GPU else copy_bandwidth_gbs(1 << 24)
    tflops = fp16_matmul_tflops()
    meta = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__, date=date.today().isoformat(),
                copy_bandwidth_gbs=bw, fp16_matmul_tflops=tflops, l2_bytes=common.l2_bytes(), smoke=args.smoke,
                note=None if HAS_GPU else "interpreter run: timings are meaningless, the script is checked only")
    log(f"{meta['device']}: copy {bw:.0f} GB/s, fp16 matmul {tflops:.1f} TFLOP/s")

    rows: list[dict] = []
    sections = set(args.sections)
    if "decode" in sections:
        rows += bench_decode(decode_shapes, [2, 3, 4], [64] if args.quick else [64, 128], decode_ms, dtype, bw,
                             compile_baselines)
        if HAS_GPU:  # bf16 activations at M = 1 on one shape
            rows += bench_decode([(4096, 11008)], [2, 3, 4], [64], [1], torch.bfloat16, bw, False)
    if "prefill" in sections:
        rows += bench_prefill(prefill_shapes, [2] if args.quick else [2, 3, 4], prefill_ms, dtype, bw)
    if "dequant" in sections:
        rows += bench_dequantize(prefill_shapes, [2] if args.quick else [2, 3, 4], dtype, bw)
    if "lora" in sections:
        rows += bench_lora(dtype)
    if "e2e" in sections and not args.no_e2e:
        import decode_e2e

        rows += decode_e2e.run([2] if args.quick else [2, 3, 4], [1, 8] if HAS_GPU else [1],
                               new_tokens=128 if HAS_GPU else 4, smoke=args.smoke, verbose=True)
    if "fq" in sections and not args.quick:
        fq_shapes = [(4096, 11008)] if HAS_GPU else [(37, 128)]
        rows += bench_fake_quant(fq_shapes, [2], [torch.float32, torch.float16, torch.bfloat16], bw,
                                 compile_baselines)
    if "calib" in sections and not args.quick:
        import calib_bench

        rows += calib_bench.run(smoke=args.smoke)
    if "sparse" in sections:
        rows += bench_sparse(prefill_shapes, [1, 16] if HAS_GPU else [1, 4], dtype, bw)
    targets = check_targets(rows)
    meta["seconds"] = time.perf_counter() - started

    def table(op, cols):
        sel = [r for r in rows if r["op"] == op]
        return markdown_table(sel, cols) if sel else "(not run)\n"

    md = (f"# saliq kernels on {meta['device']} ({meta['date']})\n\n"
          f"Measured in the same run: copy bandwidth {bw:.0f} GB/s (read + write), fp16 matmul {tflops:.1f} TFLOP/s, "
          f"L2 {meta['l2_bytes'] >> 20} MiB; torch {torch.__version__}, triton {triton.__version__}. "
          f"x_* = speedup of saliq over that baseline (fp16 = F.linear on the dequantized fp16 weight); pct_bw = "
          f"bytes moved over time, as a share of the copy bandwidth; ideal_x_fp16 = 16 / bits per weight.\n\n"
          "## Decode (CUDA graphs, weights rotated past the L2) and prefill (L2 flushed per call; x_fp16_graph: "
          "graph-timed too)\n\n"
          + table("packed_linear", ["N", "K", "bits", "group", "M", "dtype", "backend", "ms", "ms_fp16", "x_fp16",
                                    "ideal_x_fp16", "pct_bw", "x_eager", "x_compile", "us_call", "x_fp16_graph",
                                    "err"])
          + "\n## Dequantize for the prefill (W in the activation dtype, L2 flushed): Triton (best config) and CUDA\n\n"
          + table("dequantize", ["N", "K", "bits", "group", "dtype", "ms_triton", "ms_cuda", "x_triton", "pct_bw"])
          + "\n## LoRA term on a decode call (r = 64, graph-timed)\n\n"
          + table("lora", ["N", "K", "M", "ms", "ms_no_lora", "lora_overhead_pct"])
          + "\n## End-to-end decode, LLaMA-2-7B-shaped, random weights, CUDA graphs\n\n"
          + table("decode", ["bits", "group", "M", "tokens_per_s", "tokens_per_s_fp16", "x_fp16", "peak_gib",
                             "peak_gib_fp16"])
          + "\n## Fake quantization forward + backward with the saliency term\n\n"
          + table("fake_quant_fwd_bwd", ["N", "K", "bits", "dtype", "backend", "ms", "ms_triton", "ms_cuda",
                                         "pct_bw", "x_eager", "x_compile"])
          + "\n## Calibration of one LLaMA-2-7B-shaped block (W2 g64, saliq: search, wpt 1, opt 1)\n\n"
          + table("calibration", ["model", "dtype", "nsamples", "seqlen", "s_block", "s_block_first", "s_block_eager",
                                  "x_eager", "s_train", "s_train_eager", "x_eager_train", "s_saliency", "peak_gib",
                                  "peak_gib_eager", "projected_h_7B", "projected_h_13B", "projected_h_70B"])
          + "\n## Reserved weights: sparse_addmm at 0.5% density next to the 2-bit g64 packed GEMV\n\n"
          + table("sparse_addmm", ["N", "K", "M", "dtype", "backend", "nnz", "ms", "ms_gemv", "pct_of_gemv", "x_gemv",
                                   "pct_bw", "err"])
          + "\n## Bars\n\n" + markdown_table(targets, ["target", "value", "required", "met"])
          + f"\n(report took {meta['seconds']:.0f} s)\n")
    out = args.out
    if out is None and args.smoke:
        import tempfile
        out = tempfile.mkdtemp(prefix="saliq-gpu-report-smoke-")  # smoke results are not results
    jpath, mpath = common.write_results(rows + [dict(op="target", **t) for t in targets], meta, md, directory=out)
    print(md)
    log(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
