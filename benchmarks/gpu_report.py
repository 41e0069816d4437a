"""GPU report of the Triton kernels: measured roofline first, then every kernel against its baselines.

On a CUDA GPU this measures the device's copy bandwidth and fp16 matmul rate, then
- packed_linear for the LLaMA-2-7B linear shapes ([N, K] = 4096x4096, 4096x11008, 11008x4096), 2/3/4-bit,
  group 64, M in {1, 4, 16, 256, 4096}: time, effective GB/s (all bytes moved, and the packed weight alone),
  % of measured bandwidth, TFLOP/s, speedup against the eager reference, its torch.compile version and
  fp16 F.linear on the dense weight; the ideal decode speedup over fp16 is 16 / bits-per-weight (Marlin);
- fake-quant forward + backward (saliency term fused) for the same shapes against the ApiQ-style eager
  composite and its torch.compile version;
- the issue's targets, each marked met / not met;
and writes benchmarks/results/<date>-<device>.json plus a markdown table next to it.

    python benchmarks/gpu_report.py                 # on a GPU (several minutes: torch.compile baselines)
    python benchmarks/gpu_report.py --no-compile    # skip the torch.compile baselines
    python benchmarks/gpu_report.py --smoke         # tiny shapes; runs on the CPU through the interpreter
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import common
from common import (DEVICE, HAS_GPU, LLAMA2_7B_SHAPES, apiq_fake_quant, copy_bandwidth_gbs, device_name,
                    fp16_matmul_tflops, lwc_inputs, markdown_table, nbytes, random_packed, time_ms)

TARGETS = {
    "fq_speedup_vs_eager": 6.0, "fq_pct_bw": 85.0,
    "pl_m1_pct_bw_packed": 85.0, "pl_m1_speedup_fp16_2bit": 5.5, "pl_m1_speedup_fp16_3bit": 4.0,
    "pl_m4096_vs_fp16": 0.9,
}
TARGET_SHAPE = (4096, 11008)  # [N, K]


def _safe(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as exc:  # a baseline that fails (e.g. torch.compile) is reported, not fatal
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return None


def _ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def _compiled(fn, enabled: bool):
    if not enabled:
        return None
    import torch._dynamo

    # one compiled graph per shape: lift the recompile limit so later shapes do not fall back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    return torch.compile(fn, dynamic=False)


def bench_packed_linear(shapes, bits_list, groups, ms_list, bw, compile_baselines: bool) -> list[dict]:
    from saliq import ref
    from saliq.kernels import packed_matmul as pm

    dtype = torch.float16 if HAS_GPU else torch.float32
    compiled_ref = _compiled(ref.packed_matmul, compile_baselines)
    rows = []
    for n, k in shapes:
        for bits in bits_list:
            for g in groups:
                p = random_packed(n, k, bits, g, dtype)
                args = (p.qweight, p.qweight_hi, p.scales, p.zeros, bits, g, k)
                W16 = ref.dequantize(*args).to(dtype)
                packed_bytes = p.nbytes()
                for M in ms_list:
                    x = torch.randn(M, k, device=DEVICE, dtype=dtype)
                    print(f"packed_linear {n}x{k} {bits}-bit g{g} M={M}", file=sys.stderr)
                    t = time_ms(lambda: pm.packed_matmul(x, *args, None))
                    t_eager = _safe(lambda: time_ms(lambda: ref.packed_matmul(x, *args, None), rep=10))
                    t_comp = None if compiled_ref is None else _safe(
                        lambda: time_ms(lambda: compiled_ref(x, *args, None), rep=10))
                    t_fp16 = time_ms(lambda: F.linear(x, W16))
                    moved = packed_bytes + nbytes(x) + M * n * x.element_size()
                    gbs = moved / (t * 1e-3) / 1e9
                    gbs_packed = packed_bytes / (t * 1e-3) / 1e9
                    bits_per_weight = 8 * packed_bytes / (n * k)
                    rows.append(dict(
                        op="packed_linear", N=n, K=k, bits=bits, group=g, M=M, dtype=str(dtype)[6:],
                        ms=t, ms_eager=t_eager, ms_compile=t_comp, ms_fp16_linear=t_fp16,
                        gbs=gbs, pct_bw=100 * gbs / bw, gbs_packed=gbs_packed, pct_bw_packed=100 * gbs_packed / bw,
                        tflops=2 * M * n * k / (t * 1e-3) / 1e12,
                        x_eager=_ratio(t_eager, t), x_compile=_ratio(t_comp, t), x_fp16=_ratio(t_fp16, t),
                        ideal_x_fp16=16 / bits_per_weight, config=_config_used(pm, x, p, g),
                        dispatch=_dispatch(x, args)))
    return rows


def _dispatch(x, args):
    """Measure the CUDA backends of packed_matmul on this call and record the default (a `cuda` backend, when
    built, competes with `triton`)."""
    if not HAS_GPU:
        return None
    import saliq.triton_backend as tb

    return _safe(lambda: tb.tune("packed_matmul", x, *args, None))


def _config_used(pm, x, p, g):
    from saliq.kernels import autotune

    key = (p.bits, g, p.out_features, p.in_features, str(x.dtype).replace("torch.", ""),
           autotune.m_bucket(x.shape[0]), False)
    cfg = autotune.lookup("packed_matmul", key, x.device) if HAS_GPU else None
    return None if cfg is None else ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def bench_fake_quant(shapes, bits_list, groups, bw, compile_baselines: bool) -> list[dict]:
    from saliq.kernels import fake_quant as fq

    dtype = torch.float16 if HAS_GPU else torch.float32
    compiled = _compiled(apiq_fake_quant, compile_baselines)
    rows = []
    for n, k in shapes:
        for bits in bits_list:
            for g in groups:
                W, hi, lo, S = lwc_inputs(n, k, g, dtype)
                grad = torch.randn_like(W)
                greg = torch.tensor(0.1, device=DEVICE)
                print(f"fake_quant fwd+bwd {n}x{k} {bits}-bit g{g}", file=sys.stderr)

                def triton_step():
                    what, reg = fq.fake_quant_lwc_fwd(W, hi, lo, S, None, bits, g, False)
                    fq.fake_quant_lwc_bwd(grad, greg, W, hi, lo, S, None, bits, g, False, False)

                def composite_step(fn):
                    hi_, lo_ = hi.detach().requires_grad_(), lo.detach().requires_grad_()

                    def step():
                        what, reg = fn(W, hi_, lo_, bits, g, S)
                        torch.autograd.grad([what, reg], [hi_, lo_], [grad, greg])
                    return step

                t = time_ms(triton_step)
                t_eager = _safe(lambda: time_ms(composite_step(apiq_fake_quant), rep=10))
                t_comp = None if compiled is None else _safe(lambda: time_ms(composite_step(compiled), rep=10))
                # floor: forward reads W, S and writes What; backward reads the incoming gradient, W and S
                small = 4 * hi.numel() * 4  # hi, lo read; dhi, dlo written
                moved = 2 * nbytes(W) + 2 * nbytes(S) + nbytes(W) + nbytes(grad) + small
                gbs = moved / (t * 1e-3) / 1e9
                rows.append(dict(op="fake_quant_fwd_bwd", N=n, K=k, bits=bits, group=g, M=None,
                                 dtype=str(dtype)[6:], ms=t, ms_eager=t_eager, ms_compile=t_comp, gbs=gbs,
                                 pct_bw=100 * gbs / bw, x_eager=_ratio(t_eager, t), x_compile=_ratio(t_comp, t)))
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    def find(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    n, k = TARGET_SHAPE
    out = []

    def add(name, value, target, cmp=">="):
        met = None if value is None else (value >= target)
        out.append(dict(target=name, value=value, required=f"{cmp} {target}", met=met))

    for r in find(op="fake_quant_fwd_bwd", N=n, K=k, group=64):
        add(f"fake-quant fwd+bwd {n}x{k} g64 {r['bits']}-bit: x eager composite", r["x_eager"],
            TARGETS["fq_speedup_vs_eager"])
        add(f"fake-quant fwd+bwd {n}x{k} g64 {r['bits']}-bit: % copy bandwidth", r["pct_bw"], TARGETS["fq_pct_bw"])
    for r in find(op="packed_linear", N=n, K=k, group=64, M=1):
        add(f"packed_linear M=1 {n}x{k} g64 {r['bits']}-bit: % bandwidth over packed bytes", r["pct_bw_packed"],
            TARGETS["pl_m1_pct_bw_packed"])
        if r["bits"] in (2, 3):
            add(f"packed_linear M=1 {n}x{k} g64 {r['bits']}-bit: x fp16 F.linear", r["x_fp16"],
                TARGETS[f"pl_m1_speedup_fp16_{r['bits']}bit"])
    for r in find(op="packed_linear", N=n, K=k, group=64, M=4096):
        add(f"packed_linear M=4096 {n}x{k} g64 {r['bits']}-bit: throughput / fp16 F.linear", r["x_fp16"],
            TARGETS["pl_m4096_vs_fp16"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under the interpreter")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--groups", type=int, nargs="+", default=[64])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 256, 4096])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp dir)")
    args = ap.parse_args(argv)
    if not HAS_GPU and not args.smoke:
        print("gpu_report needs a CUDA GPU: not run (use --smoke for a CPU check of the script itself)",
              file=sys.stderr)
        return 2
    shapes = LLAMA2_7B_SHAPES if not args.smoke else [(37, 128), (64, 192)]
    ms_list = args.ms if not args.smoke else [1, 4, 33]
    compile_baselines = not args.no_compile and not args.smoke

    import triton

    bw = copy_bandwidth_gbs() if HAS_GPU else copy_bandwidth_gbs(1 << 24)
    tflops = fp16_matmul_tflops()
    meta = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth_gbs=bw, fp16_matmul_tflops=tflops, smoke=args.smoke,
                note=None if HAS_GPU else "interpreter run: timings are meaningless, the script is checked only")
    print(f"{meta['device']}: copy {bw:.0f} GB/s, fp16 matmul {tflops:.1f} TFLOP/s", file=sys.stderr)

    rows = bench_packed_linear(shapes, args.bits, args.groups, ms_list, bw, compile_baselines)
    rows += bench_fake_quant(shapes, args.bits, args.groups, bw, compile_baselines)
    targets = check_targets(rows)

    cols = ["op", "N", "K", "bits", "group", "M", "ms", "gbs", "pct_bw", "pct_bw_packed", "tflops", "x_eager",
            "x_compile", "x_fp16", "ideal_x_fp16"]
    from datetime import date
    table = (f"# Triton kernels on {meta['device']} ({date.today().isoformat()})\n\n"
             f"Measured copy bandwidth {bw:.0f} GB/s, fp16 matmul {tflops:.1f} TFLOP/s; torch {torch.__version__}, "
             f"triton {triton.__version__}. x_* = speedup of the Triton kernel over that baseline; pct_bw = "
             f"effective GB/s over the measured copy bandwidth.\n\n" + markdown_table(rows, cols))
    if targets:
        table += "\n## Targets\n\n" + markdown_table(targets, ["target", "value", "required", "met"])
    out = args.out
    if out is None and args.smoke:
        import tempfile
        out = tempfile.mkdtemp(prefix="saliq-gpu-report-smoke-")  # smoke results are not results
    jpath, mpath = common.write_results(rows + [dict(op="target", **t) for t in targets], meta, table,
                                        directory=out)
    print(table)
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
