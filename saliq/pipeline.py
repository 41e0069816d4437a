"""The pipelines behind the CLI and the demo: quantize a model into a checkpoint (with resume and fingerprints),
evaluate perplexity, compute a saliency file. (A checkpoint's description is checkpoint.describe.)"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .checkpoint import describe as describe_checkpoint  # noqa: F401  (the CLI and tests import it from here)
from .checks import UsageError, check_context_length, check_float_model, check_saliency_file, has_tokenizer
from .console import human, log
from .outdir import WORK_DIR, decide_out, inspect_out, out_lock

class _SaliencySource:
    """Where the saliency comes from: `path` (OUT/.calib/saliency.safetensors, or --saliency), `ident` (its
    fingerprint, part of the run's), `cached` (a work-dir cache, reused only with the expected fingerprint)."""

    def __init__(self, path: Path, ident: str, cached: bool, note: str = ""):
        self.path, self.ident, self.cached, self.note = path, ident, cached, note


def _saliency_source(saliency_path, work: Path, model_fp: str, data_fp: str) -> _SaliencySource:
    from .calibrate import saliency_fingerprint
    from .saliency import saliency_metadata

    expected = saliency_fingerprint(model_fp, data_fp)
    if not saliency_path:
        return _SaliencySource(work / "saliency.safetensors", expected, cached=True)
    path = Path(saliency_path)
    meta = saliency_metadata(path)
    if meta is None:  # to be computed and written there (an existing non-saliency file was refused before)
        return _SaliencySource(path, expected, cached=False)
    if meta.get("model_fingerprint") not in (None, model_fp):
        raise UsageError(f"--saliency {saliency_path!r} was computed for another model (its model fingerprint "
                         "differs from MODEL's); recompute it with `saliq saliency MODEL`")
    ident, note = meta.get("fingerprint"), ""
    if ident is None:  # written by an older saliq: identified by its content
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        ident = "file-sha256:" + h.hexdigest()
    elif ident != expected:
        note = (f"note: --saliency {saliency_path} was computed from other calibration samples ("
                f"{meta.get('source', '?')}, nsamples {meta.get('nsamples', '?')}, seqlen {meta.get('seqlen', '?')}, "
                f"seed {meta.get('seed', '?')}); using it as given")
    return _SaliencySource(path, ident, cached=False, note=note)


def _load_saliency(source: _SaliencySource, model, work: Path) -> dict:
    """Reuse a saliency file: a cached one only with the expected fingerprint; every value finite and >= 0."""
    from .calibrate import ResumeMismatchError
    from .saliency import load_saliency, saliency_metadata

    if source.cached:
        found = (saliency_metadata(source.path) or {}).get("fingerprint")
        if found != source.ident:
            raise ResumeMismatchError(
                f"{source.path} was computed from another model or other calibration samples (its fingerprint "
                f"{'is missing' if found is None else 'differs'}); delete {work} to start afresh")
    try:
        sal = load_saliency(source.path, model)
    except ValueError as e:
        raise UsageError(f"--saliency: {e}" if not source.cached else str(e)) from e
    if source.note:
        log(source.note)
    log(f"saliency: reusing {source.path}")
    return sal


def _saliency_meta(model_fp, data_fp, ident, model_path, calib, nsamples, seqlen, seed) -> dict:
    return {"fingerprint": ident, "model_fingerprint": model_fp, "data_fingerprint": data_fp,
            "model": str(model_path), "source": str(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


def _load_float_model(model_path, need_tokenizer: bool):
    """(model, tokenizer) of a float model; a directory without tokenizer files loads without one when none is
    needed (rtn without --eval)."""
    from . import hf

    p = Path(model_path)
    if p.is_dir() and not need_tokenizer and not has_tokenizer(p):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        model.eval().requires_grad_(False)
        log(f"{model_path} has no tokenizer files: the checkpoint is written without one")
        return model, None
    return hf.load_model(p)


def _check_model_fits(model, cfg):
    """Settings that depend on the model's shape, checked right after loading, before any other work."""
    from . import hf
    from .calibrate import check_spec_fits

    try:
        check_spec_fits(model, cfg.spec, label="--group-size ")
    except ValueError as e:
        raise UsageError(str(e)) from e
    n = len(hf.decoder_blocks(model))
    if cfg.block_multipliers and len(cfg.block_multipliers) != n:
        raise UsageError(f"--block-multipliers has {len(cfg.block_multipliers)} values; the model has {n} decoder "
                         "blocks: pass one value per block")


def quantize_model(model_path, cfg, out, **options) -> dict:
    """Load, calibrate, save (and optionally evaluate) one model; returns the result record. One run at a
    time per --out (`out_lock`); the options are those of `_quantize_model`. Under torchrun every process
    calibrates its share of each batch and process 0 writes (saliq/distributed.py)."""
    import contextlib

    from . import distributed

    if distributed.launched():
        options["device"] = distributed.init(options.get("device", "cpu"))
    with out_lock(Path(out)) if distributed.is_main() else contextlib.nullcontext():
        return _quantize_model(model_path, cfg, out, **options)


def _quantize_model(model_path, cfg, out, calib=None, nsamples=16, seqlen=256, saliency_path=None, device="cpu",
                    amp=True, offload_activations=False, eval_text=None, eval_seqlen=512, eval_max_tokens=None,
                    keep_work=False, progress=True, overwrite=False, float_bits=16) -> dict:
    """The run itself, under the --out lock.

    Everything that can be checked is checked before the first write: MODEL is a float model, --out follows
    the policy of `inspect_out` / `decide_out` (a run of the same fingerprint resumes, a finished one is not
    redone), the group size fits the model. The resume state lives in OUT/.calib: a manifest naming the run's
    fingerprint (written first), the cached saliency and the trainer's files, each carrying the fingerprint."""
    import torch

    from . import calibrate as cal
    from . import data, distributed, hf
    from . import saliency as sal_mod

    main = distributed.is_main()
    out = Path(out)
    work = out / WORK_DIR
    t_start = time.perf_counter()
    need_tok = cfg.method != "rtn" or eval_text is not None
    why = f"--method {cfg.method} (to tokenize --calib)" if cfg.method != "rtn" else "--eval"
    check_float_model(str(model_path), need_tok, why)
    state = inspect_out(out, model_path, overwrite)
    if saliency_path and cfg.uses_saliency:
        check_saliency_file(saliency_path, "--saliency")

    model, tok = _load_float_model(model_path, need_tok)
    _check_model_fits(model, cfg)
    if cfg.method != "rtn":
        check_context_length(model, seqlen, "--seqlen")
    if eval_text is not None:
        check_context_length(model, eval_seqlen, "--eval-seqlen")
    samples = windows = None
    try:
        if cfg.method != "rtn":
            samples = data.load_calibration(tok, calib, nsamples, seqlen, cfg.seed)
    except data.DataError as e:
        raise UsageError(f"--calib {str(calib)!r} (--nsamples {nsamples}, --seqlen {seqlen}): {e}") from e
    try:  # the evaluation windows too, so that a text too short for one window is reported before the work
        if eval_text is not None:
            windows = data.load_evaluation(tok, eval_text, eval_seqlen, eval_max_tokens)
    except data.DataError as e:
        raise UsageError(f"--eval {str(eval_text)!r} (--eval-seqlen {eval_seqlen}): {e}") from e
    amp_used = amp and torch.device(device).type == "cuda"
    model_fp, data_fp = cal.model_fingerprint(model), cal.samples_fingerprint(samples)
    source = _saliency_source(saliency_path, work, model_fp, data_fp) if cfg.uses_saliency else None
    components = cal.run_components(cfg, model_fp, data_fp, source.ident if source else None, amp_used)
    fingerprint = cal.fingerprint_of(components)
    action = decide_out(out, state, components, overwrite)
    if action == "noop":
        if not main:
            return {"out": str(out), "method": cfg.method, "rank": distributed.rank(), "reused": True}
        return _already_done(out, cfg, fingerprint, device, eval_text, windows, keep_work, progress, t_start)
    sal, sal_seconds = None, 0.0
    if source is not None and not source.cached and source.path.is_file():
        sal = _load_saliency(source, model, work)  # a --saliency file is checked before anything is written
    if action == "replace" and main:
        log(f"--overwrite: discarding the unfinished run in {work}")
        shutil.rmtree(work)
    if cfg.method != "rtn" and main:  # the manifest first: a kill at any later point leaves a run of known settings
        cal.check_or_write_manifest(work, components)
    distributed.barrier()
    if source is not None and sal is None:
        if source.path.is_file():
            sal = _load_saliency(source, model, work)
        else:
            t0 = time.perf_counter()
            sal = sal_mod.compute_saliency(model, samples, device=device, progress=progress)
            sal_seconds = time.perf_counter() - t0
            if main:
                sal_mod.save_saliency(sal, source.path, _saliency_meta(model_fp, data_fp, source.ident, model_path,
                                                                       calib, nsamples, seqlen, cfg.seed))
            log(f"saliency: computed in {sal_seconds:.1f} s, saved to {source.path}")
    model.to(device)
    res = cal.calibrate(model, samples if samples is not None else torch_empty_ids(), cfg,
                        work_dir=work if cfg.method != "rtn" else None, saliency=sal, device=device, amp=amp,
                        offload_activations=offload_activations, progress=progress, run_info=components)
    if res.resumed_from:
        log(f"resumed at block {res.resumed_from}")
    log(res.summary())
    seconds = sal_seconds + res.seconds
    if not main:  # process 0 saves and evaluates
        distributed.barrier()
        return {"out": str(out), "method": cfg.method, "rank": distributed.rank()}
    info = hf.save(model.to("cpu"), out, tok, method=cfg.method,
                   extra={"calibration": cfg.to_dict(), "seconds": round(seconds, 2),
                          "calibration_data": {"source": str(calib) if cfg.method != "rtn" else None,
                                               "nsamples": nsamples, "seqlen": seqlen},
                          "run": {"fingerprint": fingerprint, "components": components}},
                   files=_log_file(work, res.log), float_bits=float_bits)
    _drop_stale_log(out, res.log)
    _finish_work_dir(work, fingerprint, keep_work)
    result = {"out": str(out), "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
              "seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
              "bytes": info["bytes"], "peak_memory_bytes": res.peak_memory_bytes,
              "block_seconds": [round(s, 3) for s in res.block_seconds]}
    log(f"saved {out} ({human(info['bytes'])})")
    if windows is not None:
        result.update(_evaluate_loaded(model.to(device), windows, eval_text, progress))
    distributed.barrier()
    return result


LOG_NAME = "calibration_log.jsonl"


def _log_file(work: Path, log: list) -> dict:
    """This run's per-block, per-epoch losses as a file of the checkpoint (so the manifest covers it)."""
    if not log:
        return {}
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"checkpoint-{LOG_NAME}"
    path.write_text("".join(json.dumps(e) + "\n" for e in log))
    return {LOG_NAME: path}


def _drop_stale_log(out: Path, log: list):
    """An rtn checkpoint has no calibration log: one carried over from an earlier run in OUT goes."""
    if not log and (out / LOG_NAME).is_file():
        (out / LOG_NAME).unlink()


def _finish_work_dir(work: Path, fingerprint: str, keep_work: bool):
    """Remove OUT/.calib after a successful save (unless --keep-work), only when it belongs to this run."""
    from .calibrate import read_manifest

    if keep_work or not work.is_dir():
        return
    if (read_manifest(work) or {}).get("fingerprint") == fingerprint:
        _remove_work_dir(work)
    else:
        log(f"note: {work} holds a run with other settings; left in place")


def _remove_work_dir(work: Path):
    """Remove a work dir, its manifest last: a clean-up stopped half-way leaves a run saliq still recognises."""
    from .calibrate import MANIFEST

    for child in work.iterdir():
        if child.name != MANIFEST:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    shutil.rmtree(work)


def _already_done(out: Path, cfg, fingerprint, device, eval_text, windows, keep_work, progress, t_start) -> dict:
    """OUT already holds the checkpoint of this model, data and settings: nothing to compute."""
    from . import hf

    work = out / WORK_DIR
    log(f"{out} already holds this checkpoint (same model, calibration data and settings): nothing to do; "
         "delete it or choose another --out to quantize again")
    _finish_work_dir(work, fingerprint, keep_work)  # a run stopped between the save and the clean-up
    qc = hf.read_quant_config(out)
    result = {"out": str(out), "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
              "seconds": qc.get("seconds", 0.0), "total_seconds": round(time.perf_counter() - t_start, 2),
              "bytes": hf.checkpoint_size(out), "peak_memory_bytes": 0, "block_seconds": [], "reused": True}
    if windows is not None:  # tokenized with MODEL's tokenizer, the one the checkpoint holds
        model, _ = hf.load(out)
        result.update(_evaluate_loaded(model.to(device), windows, eval_text, progress))
    return result


def _evaluate_loaded(model, windows, eval_text, progress) -> dict:
    from .evaluate import perplexity

    ev = perplexity(model, windows, progress=progress)
    log(f"perplexity {ev['perplexity']:.3f} on {ev['tokens']} tokens of {eval_text}")
    return {"perplexity": ev["perplexity"], "tokens": ev["tokens"]}


def torch_empty_ids():
    import torch

    return torch.zeros((0, 2), dtype=torch.long)


def evaluate_model(model_path, text, seqlen=512, max_tokens=None, device="cpu", progress=True) -> dict:
    from . import data, hf
    from .evaluate import perplexity

    model, tok = hf.load_model(model_path)
    if tok is None:
        raise ValueError(f"{model_path} has no tokenizer files; it cannot be evaluated on text")
    check_context_length(model, seqlen, "--seqlen")
    windows = data.load_evaluation(tok, text, seqlen, max_tokens)
    return perplexity(model.to(device), windows, progress=progress)


def saliency_for(model_path, calib, nsamples, seqlen, seed, out, device="cpu", offload_blocks=False,
                 progress=True) -> Path:
    from . import data, hf
    from . import saliency as sal_mod

    from .calibrate import model_fingerprint, saliency_fingerprint, samples_fingerprint

    from . import distributed

    if distributed.launched():  # torchrun: each process takes a share of the samples, process 0 writes
        device = distributed.init(device)
    model, tok = hf.load_model(model_path)
    check_context_length(model, seqlen, "--seqlen")
    samples = data.load_calibration(tok, calib, nsamples, seqlen, seed)
    model_fp, data_fp = model_fingerprint(model), samples_fingerprint(samples)
    if not offload_blocks:
        model.to(device)
    sal = sal_mod.compute_saliency(model, samples, device=device, offload_blocks=offload_blocks, progress=progress)
    if distributed.is_main():
        sal_mod.save_saliency(sal, out, _saliency_meta(model_fp, data_fp, saliency_fingerprint(model_fp, data_fp),
                                                       model_path, calib, nsamples, seqlen, seed))
    distributed.barrier()
    return Path(out)
