"""CPU decode GEMV and prefill GEMM against F.linear (and the GEMV against memory bandwidth), in one process.

For 1 thread and for all threads: the copy bandwidth (read + write GB/s of a 256 MiB tensor copy, best of
7), then per case the median time of saliq's packed_matmul (exact fp32 path; "auto", the default: for fp32 x
three int8 digits, the exact kernel on CPUs without AVX512_VNNI from M = 3; for bf16 x two digits) and of
fp32 / bf16 F.linear, interleaved round by round. SALIQ_CPU_ISA=avx2 (or avx2vnni, avx512bw, avx512vnni) measures those
kernels on a CPU that has more (an AVX2 run's bf16 prefill takes fp32 tiles, while torch's bf16 F.linear keeps
AVX512_BF16). Every timed decode call (and copy) follows a stream of twice the CPU's largest cache, so the weights
come from DRAM as in a decode step. "% copy" = bytes read (packed words + scales + zeros) / time / copy bandwidth,
the copy (256 MiB, read + write) timed in the same rounds as the row's kernels, so the figure means the same on
every machine and moves with the machine's bandwidth of the moment; "read GB/s" the same for one straight read
(`torch.sum`) of as many bytes as the fp32 case reads, and "% read" the kernel's rate as a share of it (what the
read order and the compute leave of a plain stream; `make read-patterns` times the order alone); "x fp32" /
"x bf16" = F.linear time / saliq time for the same activation dtype. saliq reads the words in the CPU word order, as a
QuantLinear on the CPU keeps them (saliq/word_order.py); "v1" columns time the same calls on the same words in
format v1, in the same rounds.

Prefill (M above the GEMV crossover): median times of saliq's packed_matmul with bf16 x (dequantized bf16 tiles
+ bf16 GEMM where the CPU has AVX512_BF16) against bf16 F.linear on the same weight dequantized to bf16, and
with fp32 x against fp32 F.linear; "saliq / F.linear" is the ratio the issue bounds (<= 1.2).

    OMP_WAIT_POLICY=passive python benchmarks/bench_cpu_decode.py [--ms 1,4,8,16] [--prefill-ms 64,128,256,512]
        [--sections decode,prefill] [--shapes 11008x4096,4096x11008] [--out FILE] [--json FILE]

Run it when the machine is otherwise idle: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import CPU_COPY_BYTES, copy_bandwidth_gbs, cpu_cache_flush_bytes, cpu_model, write_report_files

from saliq import _C
from saliq import cpp_backend as cpp
from saliq import packing, word_order
from saliq.spec import QuantSpec

SHAPES = [(11008, 4096), (4096, 11008)]  # (N out_features, K in_features)
GROUP = 64


def interleaved_medians(fns: dict, rounds: int, before_each=None) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def words(P, order: str):
    """(qweight, qweight_hi) of a format-v1 PackedWeight in `order`: "cpu" (as QuantLinear keeps them) or "v1"."""
    return word_order.to_cpu_order(P.qweight, P.qweight_hi, P.bits) if order == "cpu" else (P.qweight, P.qweight_hi)


def packed_call(x, P, order: str):
    qw, qh = words(P, order)
    return lambda: cpp.packed_matmul(x, qw, qh, P.scales, P.zeros, P.bits, P.group_size, P.in_features, None)


def with_gemv(mode, fn):
    def run():
        cpp.set_cpu_gemv(mode)
        return fn()
    return run


def prefill_rows(threads: int, shapes: list, ms: list, bits_list: list, records: list) -> list:
    lines = [f"{threads} thread(s), prefill:", "",
             "| N x K | bits | M | saliq bf16 ms (v1) | F.linear bf16 ms | saliq / F.linear bf16 | saliq fp32 ms | "
             "F.linear fp32 ms | saliq / F.linear fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, k in shapes:
        g = torch.Generator().manual_seed(n + k)
        for bits in bits_list:
            q = torch.randint(0, 1 << bits, (n, k), generator=g)
            s = torch.rand(n, k // GROUP, generator=g) * 0.01 + 0.005
            z = torch.randint(0, 1 << bits, (n, k // GROUP), generator=g).float()
            spec = QuantSpec(bits=bits, group_size=GROUP)
            P32 = packing.pack_weight(q, s, z, spec, dtype=torch.float32)
            P16 = packing.pack_weight(q, s, z, spec, dtype=torch.bfloat16)
            # the baselines multiply the same weights, dequantized once to their dtype
            W32 = cpp.dequantize(P32.qweight, P32.qweight_hi, P32.scales, P32.zeros, bits, GROUP, k)
            W16 = cpp.dequantize(P16.qweight, P16.qweight_hi, P16.scales, P16.zeros, bits, GROUP, k)
            for m in ms:
                x = torch.randn(m, k, generator=g)
                xb = x.bfloat16()

                t = interleaved_medians({"saliq16": packed_call(xb, P16, "cpu"), "lin16": lambda: F.linear(xb, W16),
                                         "saliq32": packed_call(x, P32, "cpu"), "lin32": lambda: F.linear(x, W32),
                                         "v1_16": packed_call(xb, P16, "v1")},
                                        rounds=5 if m <= 128 else 3)
                r16, r32 = t["saliq16"] / t["lin16"], t["saliq32"] / t["lin32"]
                lines.append(f"| {n} x {k} | {bits} | {m} | {t['saliq16'] * 1e3:.1f} ({t['v1_16'] * 1e3:.1f}) | "
                             f"{t['lin16'] * 1e3:.1f} | {r16:.2f} | {t['saliq32'] * 1e3:.1f} | "
                             f"{t['lin32'] * 1e3:.1f} | {r32:.2f} |")
                print(lines[-1], flush=True)
                records.append({"section": "prefill", "threads": threads, "N": n, "K": k, "bits": bits, "M": m,
                                "group_size": GROUP, "saliq_bf16_s": t["saliq16"], "linear_bf16_s": t["lin16"],
                                "saliq_fp32_s": t["saliq32"], "linear_fp32_s": t["lin32"], "v1_bf16_s": t["v1_16"],
                                "ratio_bf16": r16, "ratio_fp32": r32, "load_average": os.getloadavg()[0]})
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,8,16")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma-separated")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    ap.add_argument("--prefill-ms", default="64,128,256,512")
    ap.add_argument("--sections", default="decode,prefill")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="records as JSON ({meta, records})")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    sections = set(args.sections.split(","))
    load_before = os.getloadavg()
    lines = [f"CPU decode GEMV and prefill GEMM, {cpu_model()}, cpu path "
             f"{cpp.cpu_isa()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average before "
             f"{load_before[0]:.2f}", ""]
    records = []
    for threads in sorted({int(v) for v in args.threads.split(",")}):
        torch.set_num_threads(threads)
        if "prefill" in sections:
            lines += prefill_rows(threads, shapes, [int(v) for v in args.prefill_ms.split(",")],
                                  [int(b) for b in args.bits.split(",")], records)
        if "decode" not in sections:
            continue
        bw = copy_bandwidth_gbs()
        # streamed before every timed decode call, untimed: each call then reads its weights from DRAM, as a decode
        # step does. Without it the int8 call right after the exact one on the same weights read part of them from
        # L3 (32 MB on the reference VM, 15-21 MB of weights), which flattered the fp32 figures
        flush = torch.ones(cpu_cache_flush_bytes() // 4)
        # a copy timed in the same rounds as the kernels: on a shared VM the bandwidth moves by 1.5x from minute to
        # minute, so each row's share divides by the copy of its own rounds (medians both)
        copy_src = torch.ones(CPU_COPY_BYTES // 4)
        copy_dst = torch.empty_like(copy_src)
        serial_before, calls = _C.decode_serial_calls(), 0
        lines += [f"{threads} thread(s): copy bandwidth {bw:.1f} GB/s (best of 7 before the cases)", "",
                  "| N x K | bits | M | copy GB/s (same rounds) | read GB/s (same rounds) | exact fp32 ms | "
                  "auto fp32 ms (% copy, % read) | auto bf16 ms (% copy) | F.linear fp32 ms | F.linear bf16 ms | "
                  "x fp32 (exact / auto) | x bf16 | v1 auto fp32 / bf16 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, k in shapes:
            g = torch.Generator().manual_seed(n + k)
            W = torch.randn(n, k, generator=g) * 0.02
            Wb = W.bfloat16()
            for bits in [int(b) for b in args.bits.split(",")]:
                q = torch.randint(0, 1 << bits, (n, k), generator=g)
                s = torch.rand(n, k // GROUP, generator=g) * 0.01 + 0.005
                z = torch.randint(0, 1 << bits, (n, k // GROUP), generator=g).float()
                spec = QuantSpec(bits=bits, group_size=GROUP)
                P32 = packing.pack_weight(q, s, z, spec, dtype=torch.float32)
                P16 = packing.pack_weight(q, s, z, spec, dtype=torch.bfloat16)
                b32 = n * k * bits / 8 + n * (k // GROUP) * 6
                b16 = n * k * bits / 8 + n * (k // GROUP) * 4
                read_src = torch.ones(int(b32) // 4)  # a plain stream of the bytes the fp32 case reads
                for m in ms:
                    x = torch.randn(m, k, generator=g)
                    xb = x.bfloat16()

                    rounds = 21 if m == 1 else 9
                    t = interleaved_medians({
                        "exact": with_gemv("exact", packed_call(x, P32, "cpu")),
                        "int8x3": with_gemv("auto", packed_call(x, P32, "cpu")),
                        "int8x2": with_gemv("auto", packed_call(xb, P16, "cpu")), "lin32": lambda: F.linear(x, W),
                        "lin16": lambda: F.linear(xb, Wb), "copy": lambda: copy_dst.copy_(copy_src),
                        "read": read_src.sum, "v1_int8x3": with_gemv("auto", packed_call(x, P32, "v1")),
                        "v1_int8x2": with_gemv("auto", packed_call(xb, P16, "v1"))},
                        rounds=rounds, before_each=lambda: flush.add_(1.0))
                    bw_rounds = 2 * copy_src.nbytes / t["copy"] / 1e9
                    calls += 5 * (rounds + 1)  # five saliq calls, each warmed once then timed every round
                    cpp.set_cpu_gemv("auto")
                    read_gbs = read_src.nbytes / t["read"] / 1e9
                    pct = lambda b, sec: 100 * b / sec / 1e9 / bw_rounds  # noqa: E731
                    lines.append(
                        f"| {n} x {k} | {bits} | {m} | {bw_rounds:.1f} | {read_gbs:.1f} | {t['exact'] * 1e3:.3f} | "
                        f"{t['int8x3'] * 1e3:.3f} ({pct(b32, t['int8x3']):.0f}%, {100 * t['read'] / t['int8x3']:.0f}%) | "
                        f"{t['int8x2'] * 1e3:.3f} ({pct(b16, t['int8x2']):.0f}%) | "
                        f"{t['lin32'] * 1e3:.3f} | {t['lin16'] * 1e3:.3f} | {t['lin32'] / t['exact']:.1f}x / "
                        f"{t['lin32'] / t['int8x3']:.1f}x | {t['lin16'] / t['int8x2']:.1f}x | "
                        f"{t['v1_int8x3'] * 1e3:.3f} / {t['v1_int8x2'] * 1e3:.3f} |")
                    print(lines[-1], flush=True)
                    records.append({"section": "decode", "threads": threads, "N": n, "K": k, "bits": bits, "M": m,
                                    "group_size": GROUP, "exact_fp32_s": t["exact"], "int8x3_fp32_s": t["int8x3"],
                                    "int8x2_bf16_s": t["int8x2"], "linear_fp32_s": t["lin32"],
                                    "linear_bf16_s": t["lin16"], "copy_gbs": bw, "copy_gbs_same_rounds": bw_rounds,
                                    "read_s": t["read"], "read_gbs_same_rounds": read_gbs,
                                    "v1_int8x3_fp32_s": t["v1_int8x3"], "v1_int8x2_bf16_s": t["v1_int8x2"],
                                    "load_average": os.getloadavg()[0]})
        if threads > 1:  # a stalled join (a worker descheduled by the host) runs the next calls on one thread
            serial = _C.decode_serial_calls() - serial_before
            lines += ["", f"saliq calls run on one thread after a stalled join (csrc/cpu/work_pool.cpp): {serial} of about "
                          f"{calls}" + (" -- their rows time one thread, not all" if serial else "")]
            records.append({"section": "decode", "threads": threads, "serial_calls": serial, "saliq_calls": calls})
        lines.append("")
    load_after = os.getloadavg()
    lines.append(f"load average after {load_after[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    meta = {"cpu": cpu_model(), "cpu_path": cpp.cpu_isa(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_before": load_before,
            "load_average_after": load_after, "threads": args.threads}
    write_report_files(text, {"meta": meta, "records": records}, args.out, args.json)
    return records


if __name__ == "__main__":
    main()
