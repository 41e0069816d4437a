"""The pipelines behind the CLI and the demo: quantize a model into a checkpoint (with resume and fingerprints),
evaluate perplexity, compute a saliency file, describe a checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .checks import UsageError, check_float_model, check_saliency_file, has_tokenizer
from .console import human, log
from .outdir import WORK_DIR, decide_out, inspect_out

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


def quantize_model(model_path, cfg, out, calib=None, nsamples=16, seqlen=256, saliency_path=None, device="cpu",
                   amp=True, offload_activations=False, eval_text=None, eval_seqlen=512, eval_max_tokens=None,
                   keep_work=False, progress=True, overwrite=False) -> dict:
    """Load, calibrate, save (and optionally evaluate) one model; returns the result record.

    Everything that can be checked is checked before the first write: MODEL is a float model, --out follows
    the policy of `inspect_out` / `decide_out` (a run of the same fingerprint resumes, a finished one is not
    redone), the group size fits the model. The resume state lives in OUT/.calib: a manifest naming the run's
    fingerprint (written first), the cached saliency and the trainer's files, each carrying the fingerprint."""
    import torch

    from . import calibrate as cal
    from . import data, hf
    from . import saliency as sal_mod

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
        return _already_done(out, cfg, fingerprint, device, eval_text, windows, keep_work, progress, t_start)
    sal, sal_seconds = None, 0.0
    if source is not None and not source.cached and source.path.is_file():
        sal = _load_saliency(source, model, work)  # a --saliency file is checked before anything is written
    if action == "replace":
        log(f"--overwrite: discarding the unfinished run in {work}")
        shutil.rmtree(work)
    if cfg.method != "rtn":  # the manifest first: a kill at any later point leaves a run of known settings
        cal.check_or_write_manifest(work, components)
    if source is not None and sal is None:
        if source.path.is_file():
            sal = _load_saliency(source, model, work)
        else:
            t0 = time.perf_counter()
            sal = sal_mod.compute_saliency(model, samples, device=device, progress=progress)
            sal_seconds = time.perf_counter() - t0
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
    info = hf.save(model.to("cpu"), out, tok, method=cfg.method,
                   extra={"calibration": cfg.to_dict(), "seconds": round(seconds, 2),
                          "calibration_data": {"source": str(calib) if cfg.method != "rtn" else None,
                                               "nsamples": nsamples, "seqlen": seqlen},
                          "run": {"fingerprint": fingerprint, "components": components}})
    _write_log(out, res.log)
    _finish_work_dir(work, fingerprint, keep_work)
    result = {"out": str(out), "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
              "seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
              "bytes": info["bytes"], "peak_memory_bytes": res.peak_memory_bytes,
              "block_seconds": [round(s, 3) for s in res.block_seconds]}
    log(f"saved {out} ({human(info['bytes'])})")
    if windows is not None:
        result.update(_evaluate_loaded(model.to(device), windows, eval_text, progress))
    return result


def _write_log(out: Path, log: list):
    """OUT/calibration_log.jsonl: this run's per-block, per-epoch losses (none for rtn: a stale one goes)."""
    path = out / "calibration_log.jsonl"
    if log:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in log))
        os.replace(tmp, path)
    elif path.is_file():
        path.unlink()


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
    from .calibrate import read_manifest

    work = out / WORK_DIR
    log(f"{out} already holds this checkpoint (same model, calibration data and settings): nothing to do; "
         "delete it or choose another --out to quantize again")
    if work.is_dir() and (read_manifest(work) or {}).get("fingerprint") == fingerprint:
        log_path = work / "calibration_log.jsonl"  # a run stopped between the save and the clean-up
        if log_path.is_file() and not (out / "calibration_log.jsonl").is_file():
            shutil.copy(log_path, out / "calibration_log.jsonl")
    _finish_work_dir(work, fingerprint, keep_work)
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
    windows = data.load_evaluation(tok, text, seqlen, max_tokens)
    return perplexity(model.to(device), windows, progress=progress)


def saliency_for(model_path, calib, nsamples, seqlen, seed, out, device="cpu", offload_blocks=False,
                 progress=True) -> Path:
    from . import data, hf
    from . import saliency as sal_mod

    from .calibrate import model_fingerprint, saliency_fingerprint, samples_fingerprint

    model, tok = hf.load_model(model_path)
    samples = data.load_calibration(tok, calib, nsamples, seqlen, seed)
    model_fp, data_fp = model_fingerprint(model), samples_fingerprint(samples)
    if not offload_blocks:
        model.to(device)
    sal = sal_mod.compute_saliency(model, samples, device=device, offload_blocks=offload_blocks, progress=progress)
    sal_mod.save_saliency(sal, out, _saliency_meta(model_fp, data_fp, saliency_fingerprint(model_fp, data_fp),
                                                   model_path, calib, nsamples, seqlen, seed))
    return Path(out)


def describe_checkpoint(ckpt_dir) -> dict:
    """Quantization config and a size breakdown (packed weights, LoRA, other tensors) of a checkpoint, after the
    verification `saliq.load` does (every file against the manifest): CheckpointError names a damaged file.

    bytes: the checkpoint's own files (the manifest's); extra_files: entries of the directory it does not list
    (ignored by the loader, not counted)."""
    from .checkpoint import verify

    ck = verify(ckpt_dir)
    qc = ck.quant_config
    sizes = {"packed": 0, "lora": 0, "other": 0}
    weights = 0
    per_word = 32 // (2 if qc["bits"] == 3 else qc["bits"])
    for key, dtype, shape in ck.tensor_headers():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * _DTYPE_BYTES.get(dtype, 4)
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("qweight", "qweight_hi", "scales", "zeros"):
            sizes["packed"] += nbytes
            if leaf == "qweight" and len(shape) == 2:
                weights += shape[0] * per_word * shape[1]
        elif leaf in ("lora_A", "lora_B"):
            sizes["lora"] += nbytes
        else:
            sizes["other"] += nbytes
    return {"dir": str(ckpt_dir), "quantization_config": {k: v for k, v in qc.items() if k != "modules"},
            "quantized_layers": len(qc["modules"]), "quantized_weights": weights,
            "bytes": ck.total_bytes, "packed_bytes": sizes["packed"], "lora_bytes": sizes["lora"],
            "other_bytes": sizes["other"],
            "packed_bits_per_weight": 8 * sizes["packed"] / max(weights, 1),
            "files": len(ck.files) + (0 if ck.legacy else 1), "extra_files": ck.extra,
            "verified": "legacy: shards only (no manifest)" if ck.legacy else "all files (manifest)"}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
