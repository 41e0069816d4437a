"""Calibration speed of one LLaMA-2-7B-shaped decoder block: saliq's default backends against the eager `ref`.

A one-block LlamaForCausalLM of LLaMA-2-7B's shape with random weights (bf16 on a GPU) is calibrated by
`saliq.calibrate` exactly as `saliq quantize` does (W2 g64, method saliq: clipping search, one wpt and one
opt epoch, LoRA r 64), once with the default backends and once with every op forced to `ref` (the eager
composite), on `nsamples` x `seqlen` random tokens. The saliency pass is timed on its own. The first default
run compiles and tunes the Triton kernels (`s_block_first`, what a new user's first block pays); the timed
runs come after it, each backend warm. Reported per backend: seconds for the block and for its training epochs
alone (`s_train`, `x_eager_train`: the trainer's step, where the fused kernels work), peak memory; and the
projection to ApiQ's budget (128 samples x 2048 tokens, 20 epochs) for a whole model: blocks x (epochs x
seconds per sample-epoch + the rest of the block scaled by tokens), scaled by each model's weights per block
(LLaMA-2 7B, 13B; 70B with its grouped-query attention). The projection is arithmetic on the measured block,
not a measurement.

    python benchmarks/calib_bench.py            # GPU: 8 samples x 2048 tokens
    python benchmarks/calib_bench.py --profile  # also where a warm block's time goes (torch profiler)
    python benchmarks/calib_bench.py --smoke    # tiny block on the CPU: checks the script, times nothing

benchmarks/gpu_report.py calls `run(smoke)` and gets the records (op "calibration").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time

import torch

# (hidden, intermediate, heads, kv heads, blocks) of the LLaMA-2 family
MODELS = {"7B": (4096, 11008, 32, 32, 32), "13B": (5120, 13824, 40, 40, 40), "70B": (8192, 28672, 64, 8, 80)}
APIQ_SAMPLES, APIQ_SEQLEN, APIQ_EPOCHS = 128, 2048, 20
GIB = float(1 << 30)


def block_weights(hidden, inter, heads, kv_heads) -> int:
    """Weights of the 7 linears of one block."""
    head_dim = hidden // heads
    return hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter


def make_block_model(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    else:
        hidden, inter, heads, kv, _ = MODELS["7B"]
        cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    dtype = torch.bfloat16 if torch.cuda.is_available() and not smoke else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval().requires_grad_(False)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def _print_profile(calibrate_once, device, rows: int = 25):
    """Where a warm block's time goes, per backend: the torch profiler's top ops by device (else CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("default", "ref"):
        with profile(activities=acts) as prof:
            calibrate_once(name)
        print(f"\n== profile of one block, {name} backends (top {rows} by {key})", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), file=sys.stderr,
              flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(smoke: bool = False, nsamples: int = 8, seqlen: int = 2048, verbose: bool = True,
        profile: bool = False) -> list[dict]:
    from saliq import backends
    from saliq import saliency as saliency_mod
    from saliq.calibrate import CalibConfig, calibrate

    if smoke:
        nsamples, seqlen = 2, 32
    model = make_block_model(smoke)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    samples = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=gen)
    cfg = CalibConfig(method="saliq", bits=2, group_size=64 if not smoke else 32, epochs=1)
    epochs = sum(e for _, e in cfg.schedule)
    _sync(device)
    t0 = time.perf_counter()
    sal = saliency_mod.compute_saliency(model, samples, device=device)
    _sync(device)
    saliency_s = time.perf_counter() - t0

    def calibrate_once(name):
        work = copy.deepcopy(model)
        _peak_reset(device)
        with backends.use_backend("ref") if name == "ref" else contextlib.nullcontext():
            t0 = time.perf_counter()
            res = calibrate(work, samples, cfg, saliency=sal, device=device, progress=False)
            _sync(device)
            out = (time.perf_counter() - t0, _peak_gib(device), res)
        del work
        return out

    # The first default run compiles and tunes the Triton kernels (what a new user's first block pays); the
    # timed runs come after it, each backend warm, so x_eager compares steady-state blocks.
    first_s = calibrate_once("default")[0]
    if verbose:
        print(f"calibration block (default, first: compiles and tunes): {first_s:.2f} s", file=sys.stderr, flush=True)
    timings = {}
    for name in ("default", "ref"):
        timings[name] = calibrate_once(name)
        if verbose:
            print(f"calibration block ({name}): {timings[name][0]:.2f} s", file=sys.stderr, flush=True)
    if profile:
        _print_profile(calibrate_once, device)

    seconds, peak, res = timings["default"]
    seconds_eager, peak_eager, res_eager = timings["ref"]
    # the trainer's epochs (the log's own times, synchronised at each epoch's end) apart from the rest of the
    # block (clipping search, targets, packing), which does not grow with the epochs
    train = sum(e["seconds"] for e in res.log)
    train_eager = sum(e["seconds"] for e in res_eager.log)
    per_sample_epoch = train / (nsamples * epochs)
    c = model.config
    hidden, inter = c.hidden_size, c.intermediate_size
    measured_weights = block_weights(hidden, inter, c.num_attention_heads, c.num_key_value_heads)
    # ApiQ's budget: 128 samples, 20 epochs, scaled by tokens (seqlen) and by each model's weights per block; the
    # rest of the block scaled by tokens too (an upper bound: the clipping search does not grow with them)
    tokens = APIQ_SAMPLES * APIQ_SEQLEN / (nsamples * seqlen)
    budget_block_s = per_sample_epoch * nsamples * APIQ_EPOCHS * tokens + max(seconds - train, 0.0) * tokens
    rec = dict(op="calibration", model="tiny block" if smoke else "7B-shaped block", N=hidden, K=inter,
               bits=cfg.bits, group=cfg.group_size,
               dtype=str(next(model.parameters()).dtype).removeprefix("torch."), nsamples=nsamples, seqlen=seqlen,
               epochs=epochs, s_block=round(seconds, 3), s_block_first=round(first_s, 3),
               s_block_eager=round(seconds_eager, 3),
               x_eager=round(seconds_eager / seconds, 3), s_train=round(train, 3), s_train_eager=round(train_eager, 3),
               x_eager_train=round(train_eager / train, 3) if train > 0 else None, s_saliency=round(saliency_s, 3),
               s_per_sample_epoch=round(per_sample_epoch, 4),
               peak_gib=None if peak is None else round(peak, 2),
               peak_gib_eager=None if peak_eager is None else round(peak_eager, 2))
    for label, (h, i, nh, nkv, blocks) in MODELS.items():
        scale = block_weights(h, i, nh, nkv) / measured_weights
        rec[f"projected_h_{label}"] = round(budget_block_s * scale * blocks / 3600, 2)
    return [rec]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny block on the CPU")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="also print where a warm block's time goes, per backend")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("calib_bench needs a CUDA GPU (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    print(json.dumps(run(args.smoke, args.nsamples, args.seqlen, profile=args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
