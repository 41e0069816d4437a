"""`saliq quantize` killed at every stage and rerun with the same command ends with exactly the checkpoint of an
uninterrupted run; cached intermediates of other inputs are never reused.

A kill is simulated by raising a BaseException (not caught by the CLI's error handling) from a monkeypatched
function at the chosen moment."""
import json
import os
from pathlib import Path

import pytest
import torch

from fixtures_llama import TEXT, make_byte_tokenizer, make_tiny_llama
from saliq import calibrate as C
from saliq import hf, pipeline
from saliq import resume as R
from saliq import saliency as S
from saliq.cli import main

SMALL = ["--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--lora-rank", "8", "--epochs", "1",
         "--no-progress"]
STEPS_PER_BLOCK = 8  # saliq's default schedule wpt:1, opt:1 on 4 samples of batch 1


class Killed(BaseException):
    """The process dies here (nothing in saliq catches a BaseException that is not KeyboardInterrupt)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model = d / "model"
    make_tiny_llama().save_pretrained(model)
    make_byte_tokenizer().save_pretrained(model)
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text(" ".join(reversed(TEXT.split())) * 2)
    return d


def _quantize(files, out, calib="a.txt", *extra):
    return main(["quantize", str(files / "model"), "--calib", str(files / calib), "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def reference(files):
    """Uninterrupted runs, one per calibration text."""
    refs = {}
    for calib in ("a.txt", "b.txt"):
        out = files / f"ref-{calib}"
        assert _quantize(files, out, calib) == 0
        refs[calib] = out
    return refs


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _log(d):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (Path(d) / "calibration_log.jsonl").read_text().splitlines()]


def assert_same_checkpoint(got, want):
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _log(got) == _log(want)
    qa, qb = hf.read_quant_config(got), hf.read_quant_config(want)
    assert qa["run"] == qb["run"] and qa["calibration"] == qb["calibration"]


def kill_at(monkeypatch, owner, name, n=1, when=None):
    """Make `owner.name` raise Killed at its n-th call (counting only calls for which `when(*args)` holds)."""
    orig = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise Killed(f"{name} call {n}")
        return orig(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


KILL_POINTS = {
    "before the saliency pass": lambda mp: kill_at(mp, S, "compute_saliency"),
    "during the saliency pass": lambda mp: kill_at(mp, S, "_block_backward", n=2),
    "while the saliency file is written": lambda mp: kill_at(
        mp, os, "replace", when=lambda src, dst, **k: str(dst).endswith("saliency.safetensors")),
    "after the saliency pass, before block 0": lambda mp: kill_at(mp, C._BlockTrainer, "_calibrate_block"),
    "in the middle of block 1": lambda mp: kill_at(mp, C._BlockTrainer, "_step_loss", n=STEPS_PER_BLOCK + 3),
    "between block 0's files and its commit": lambda mp: kill_at(
        mp, R, "_atomic", when=lambda path, write: path.name == R.PROGRESS),
    "after the last block, before the save": lambda mp: kill_at(mp, hf, "save"),
    "after the save, before the clean-up": lambda mp: kill_at(mp, pipeline, "_finish_work_dir"),
}
RERUN_SAYS = {
    "after the saliency pass, before block 0": "saliency: reusing",
    "between block 0's files and its commit": "saliency: reusing",
    "in the middle of block 1": "resumed at block 1",
    "after the last block, before the save": "resumed at block 2",
    "after the save, before the clean-up": "nothing to do",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_checkpoint(point, files, reference, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(Killed):
            _quantize(files, out)
    assert (out / ".calib" / C.MANIFEST).is_file()  # the run's fingerprint is written before any work
    capsys.readouterr()
    torch.manual_seed(1234)  # a restarted process has another RNG state; the result must not depend on it
    assert _quantize(files, out) == 0
    err = capsys.readouterr().err
    assert RERUN_SAYS.get(point, "saliency: computed") in err
    assert_same_checkpoint(out, reference["a.txt"])
    assert not (out / ".calib").exists()
    assert not list(tmp_path.glob("out.*"))  # no temporary or old sibling left by the save


def test_a_finished_run_rerun_is_a_no_op(files, reference, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in reference["a.txt"].iterdir()}
    assert _quantize(files, reference["a.txt"], "a.txt", "--json") == 0
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and json.loads(captured.out.splitlines()[-1])["reused"] is True
    assert {p.name: p.stat().st_mtime_ns for p in reference["a.txt"].iterdir()} == before
    # the calibration log is a file of the checkpoint: its checksum is in the manifest
    manifest = json.loads((reference["a.txt"] / hf.MANIFEST_NAME).read_text())
    assert "calibration_log.jsonl" in manifest["files"]


def test_a_cached_saliency_is_never_reused_for_other_calibration_text(files, reference, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        KILL_POINTS["after the saliency pass, before block 0"](mp)
        with pytest.raises(Killed):
            _quantize(files, out, "a.txt")
    cached = out / ".calib" / "saliency.safetensors"
    assert cached.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _quantize(files, out, "b.txt")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "reusing" not in err
    assert "holds an unfinished run with other settings (differs in: the calibration samples" in err
    assert cached.is_file()  # refused, nothing touched

    assert _quantize(files, out, "b.txt", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "reusing" not in err and "saliency: computed" in err
    assert_same_checkpoint(out, reference["b.txt"])


def test_a_cached_saliency_with_another_fingerprint_is_an_error(files, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        KILL_POINTS["after the saliency pass, before block 0"](mp)
        with pytest.raises(Killed):
            _quantize(files, out)
    cached = out / ".calib" / "saliency.safetensors"
    save_file(load_file(str(cached)), str(cached), metadata={"saliq_saliency": "fisher_diagonal_sum",
                                                            "fingerprint": "0" * 64})
    capsys.readouterr()
    assert _quantize(files, out) == 1
    err = capsys.readouterr().err
    assert "reusing" not in err and "was computed from another model or other calibration samples" in err


def _saliency_file(files, path, edit=None, model_seed=None):
    model_dir = files / "model"
    if model_seed is not None:  # another model of the same shape
        model_dir = files / f"model-{model_seed}"
        if not model_dir.exists():
            make_tiny_llama(seed=model_seed).save_pretrained(model_dir)
            make_byte_tokenizer().save_pretrained(model_dir)
    assert main(["saliency", str(model_dir), "--calib", str(files / "a.txt"), "--out", str(path), "--nsamples", "2",
                 "--seqlen", "32", "--no-progress"]) == 0
    if edit is not None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        edit(tensors["model.layers.1.mlp.down_proj"])
        save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.view(-1)[5].fill_(-1.0), "model.layers.1.mlp.down_proj .* has 1 negative or non-finite values"),
    (lambda t: t.view(-1)[:3].fill_(float("nan")), "has 3 negative or non-finite values"),
    (lambda t: t.view(-1)[0].fill_(float("inf")), "has 1 negative or non-finite values"),
])
def test_a_saliency_file_with_negative_or_non_finite_values_is_refused(edit, match, files, tmp_path, capsys):
    sal = _saliency_file(files, tmp_path / "s.safetensors", edit)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _quantize(files, tmp_path / "out", "a.txt", "--saliency", str(sal))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("saliq quantize: error: --saliency: ")
    assert pytest.importorskip("re").search(match, err) and "must be finite and >= 0" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_saliency_file_of_another_model_or_not_a_saliency_file_is_refused(files, tmp_path, capsys):
    other = _saliency_file(files, tmp_path / "other.safetensors", model_seed=7)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _quantize(files, tmp_path / "out", "a.txt", "--saliency", str(other))
    assert exc.value.code == 2 and "was computed for another model" in capsys.readouterr().err

    weights = files / "model" / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(SystemExit) as exc:
        _quantize(files, tmp_path / "out", "a.txt", "--saliency", str(weights))
    assert exc.value.code == 2 and "exists but is not a saliency file saliq wrote" in capsys.readouterr().err
    assert weights.read_bytes() == before
    with pytest.raises(SystemExit) as exc:
        main(["saliency", str(files / "model"), "--calib", str(files / "a.txt"), "--out", str(weights)])
    assert exc.value.code == 2 and weights.read_bytes() == before


def test_a_saliency_file_from_other_samples_is_used_as_given_with_a_note(files, tmp_path, capsys):
    sal = _saliency_file(files, tmp_path / "s.safetensors")  # 2 samples; quantize draws 4
    capsys.readouterr()
    assert _quantize(files, tmp_path / "out", "a.txt", "--saliency", str(sal)) == 0
    err = capsys.readouterr().err
    assert "computed from other calibration samples" in err and "nsamples 2" in err and "reusing" in err


def test_a_damaged_checkpoint_of_the_same_settings_is_not_taken_as_done(files, reference, tmp_path, capsys):
    import shutil

    if not hasattr(hf, "verify"):
        pytest.skip("this hf has no checkpoint verification")
    out = tmp_path / "ck"
    shutil.copytree(reference["a.txt"], out)
    shard = next(out.glob("model-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _quantize(files, out)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds a damaged saliq checkpoint of these settings" in err
    assert _quantize(files, out, "a.txt", "--overwrite") == 0
    assert_same_checkpoint(out, reference["a.txt"])
