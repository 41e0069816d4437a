"""`saliq quantize`: what --out may be, which models and texts are accepted, and how errors read (one line,
exit 2 before any work for bad arguments, no traceback without --debug)."""
import json
import os
import sys
from pathlib import Path

import pytest

from fixtures_llama import TEXT, make_tiny_llama, write_model_and_text
from saliq import hf
from saliq.cli import UsageError, main

SMALL = ["--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--lora-rank", "8", "--epochs", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_model_and_text(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def rtn_ckpt(files):
    out = files / "rtn-ckpt"
    assert main(["quantize", str(files / "model"), "--method", "rtn", "--out", str(out), *SMALL]) == 0
    return out


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _refused(capsys, argv, match, code=2):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"saliq {argv[0]}: error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def _rtn(files, out, *extra, model=None):
    return ["quantize", str(model or files / "model"), "--method", "rtn", "--out", str(out), *SMALL, *extra]


# ---------------------------------------------------------------- 1. never the model's files
@pytest.mark.parametrize("where, match", [
    (lambda d: d / "model", "is MODEL itself"),
    (lambda d: d / "model" / "sub", "is inside the model directory"),
    (lambda d: d, "contains the model"),
])
def test_out_is_never_the_model_directory_inside_it_or_around_it(files, capsys, where, match):
    before = _snapshot(files / "model")
    for extra in ([], ["--overwrite"]):
        _refused(capsys, _rtn(files, where(files), *extra), match)
    assert _snapshot(files / "model") == before and not (files / "model" / "sub").exists()


def test_out_never_holds_a_gguf_model_file(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    _refused(capsys, ["quantize", str(gguf), "--method", "rtn", "--out", str(tmp_path), "--overwrite"],
             "contains the model")
    assert gguf.read_bytes() == b"GGUF not really"


def test_out_is_never_the_current_directory(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, _rtn(files, "."), "is (or contains) the current directory")


# ---------------------------------------------------------------- 7. new, empty, or saliq's own
@pytest.mark.parametrize("content", [
    {"config.json": '{"model_type": "llama"}', "tokenizer.json": "{}", "model.safetensors.index.json": "{}"},
    {"notes.txt": "my notes"},
    {"sub/deep.txt": "x"},
])
def test_a_non_empty_directory_saliq_did_not_write_is_refused_even_with_overwrite(files, tmp_path, capsys, content):
    out = tmp_path / "theirs"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        _refused(capsys, _rtn(files, out, *extra), "is a non-empty directory saliq did not write")
    assert _snapshot(out) == before


def test_a_new_or_empty_directory_is_fine(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert main(_rtn(files, out)) == 0
        assert hf.read_quant_config(out)["bits"] == 2


def test_a_checkpoint_of_other_settings_needs_overwrite(files, rtn_ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(rtn_ckpt, out)
    before = _snapshot(out)
    line = _refused(capsys, _rtn(files, out, "--bits", "3"), "holds a saliq checkpoint made with other settings")
    assert "settings: bits 2 -> 3" in line and "--overwrite" in line
    assert _snapshot(out) == before
    assert main(_rtn(files, out, "--bits", "3", "--overwrite")) == 0
    assert hf.read_quant_config(out)["bits"] == 3
    model, _ = hf.load(out)
    assert model is not None


# ---------------------------------------------------------------- 2. rtn into an unfinished run
def test_rtn_into_an_unfinished_run_keeps_its_resume_state(files, tmp_path, capsys, monkeypatch):
    from saliq import calibrate as C

    out = tmp_path / "run"
    orig = C._BlockTrainer._calibrate_block

    def die_in_block_1(self, i, *a):
        if i == 1:
            raise KeyboardInterrupt
        return orig(self, i, *a)

    monkeypatch.setattr(C._BlockTrainer, "_calibrate_block", die_in_block_1)
    assert main(["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--out", str(out),
                 *SMALL]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.undo()
    before = _snapshot(out)
    assert json.loads((out / ".calib" / "progress.json").read_text())["next_block"] == 1

    line = _refused(capsys, _rtn(files, out), "holds an unfinished run with other settings")
    assert "the method (saliq -> rtn)" in line
    assert _snapshot(out) == before and not (out / "config.json").exists()

    assert main(_rtn(files, out, "--overwrite")) == 0
    assert "discarding the unfinished run" in capsys.readouterr().err
    assert not (out / ".calib").exists() and not (out / "calibration_log.jsonl").exists()
    assert hf.read_quant_config(out)["method"] == "rtn"


# ---------------------------------------------------------------- 4. already quantized models
@pytest.mark.parametrize("extra", [["--method", "rtn", "--bits", "4"], ["--method", "apiq", "--calib", "TEXT"]])
def test_quantizing_a_saliq_checkpoint_is_refused(files, rtn_ckpt, tmp_path, capsys, extra):
    extra = [str(files / "text.txt") if a == "TEXT" else a for a in extra]
    _refused(capsys, ["quantize", str(rtn_ckpt), "--out", str(tmp_path / "o"), *SMALL, *extra],
             f"MODEL '{rtn_ckpt}' is a saliq checkpoint, already quantized (rtn W2 g32)")
    assert not (tmp_path / "o").exists()


def test_saliency_of_a_saliq_checkpoint_or_another_quantized_model_is_refused(files, rtn_ckpt, tmp_path, capsys):
    _refused(capsys, ["saliency", str(rtn_ckpt), "--calib", str(files / "text.txt"), "--out",
                      str(tmp_path / "s.safetensors")], "is a saliq checkpoint, already quantized")
    other = tmp_path / "gptq"
    make_tiny_llama().save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, _rtn(files, tmp_path / "o", model=other), "is already quantized (quantization_config."
             "quant_method 'gptq')")


# ---------------------------------------------------------------- 6. models, tokenizers, writability
def test_a_model_directory_without_weights_is_refused_before_loading(files, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((files / "model" / "config.json").read_text())
    _refused(capsys, _rtn(files, tmp_path / "o", model=bare), "has a config.json but no weights")
    (bare / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002."
                                                                                   "safetensors"}}))
    _refused(capsys, _rtn(files, tmp_path / "o", model=bare), "weight file(s) listed in model.safetensors.index.json "
             "are missing (e.g. model-00001-of-00002.safetensors)")


def test_rtn_needs_no_tokenizer_but_calibration_and_eval_do(files, tmp_path, capsys):
    bare = tmp_path / "no-tokenizer"
    make_tiny_llama().save_pretrained(bare)
    assert main(_rtn(files, tmp_path / "o", model=bare)) == 0
    assert "has no tokenizer files: the checkpoint is written without one" in capsys.readouterr().err
    model, tok = hf.load(tmp_path / "o")
    assert tok is None and model is not None
    _refused(capsys, ["quantize", str(bare), "--method", "apiq", "--calib", str(files / "text.txt"), "--out",
                      str(tmp_path / "o2"), *SMALL], "has no tokenizer files")
    _refused(capsys, _rtn(files, tmp_path / "o2", "--eval", str(files / "text.txt"), model=bare),
             "--eval needs one")


def test_an_out_that_cannot_be_created_or_written_is_refused_before_loading(files, tmp_path, capsys, monkeypatch):
    from saliq import pipeline

    monkeypatch.setattr(pipeline, "_load_float_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "f").write_text("x")
    _refused(capsys, _rtn(files, tmp_path / "f" / "ck"), "cannot be created: ")
    if sys.platform.startswith("linux"):
        _refused(capsys, _rtn(files, "/proc/saliq-test-out"), "is not writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    if os.geteuid() == 0:  # root writes anywhere: make the directory look read-only the way access() reports it
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro else real_access(p, m, **k))
    else:
        ro.chmod(0o500)
    try:
        _refused(capsys, _rtn(files, ro), f"--out '{ro}' is not writable: permission denied")
        _refused(capsys, _rtn(files, ro / "sub"), "is not writable")
    finally:
        ro.chmod(0o700)


def test_binary_calibration_text_is_refused_naming_the_file(files, tmp_path, capsys):
    exe = tmp_path / "tool"
    exe.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    _refused(capsys, ["quantize", str(files / "model"), "--method", "apiq", "--calib", str(exe), "--out",
                      str(tmp_path / "o"), *SMALL], f"--calib: text file '{exe}' is binary (NUL byte at offset 7")


# ---------------------------------------------------------------- errors: one line, a traceback only with --debug
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch):
    from saliq import pipeline

    def broken(*a):
        raise TypeError("something\nbroke")

    monkeypatch.setattr(pipeline, "_load_float_model", broken)
    assert main(_rtn(files, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("saliq quantize: error: TypeError: something broke (rerun with --debug for the "
                           "traceback)")
    with pytest.raises(TypeError, match="broke"):
        main(_rtn(files, tmp_path / "o", "--debug"))
    with pytest.raises(UsageError, match="is MODEL itself"):
        main(_rtn(files, files / "model", "--debug"))


@pytest.mark.parametrize("extra, match", [
    (["--method", "apiq", "--calib", "TEXT", "--seqlen", "200"], "--calib '{TEXT}' (--nsamples 4, --seqlen "
     "200): the calibration text has"),
    (["--method", "rtn", "--eval", "TEXT", "--eval-seqlen", "200"], "--eval '{TEXT}' (--eval-seqlen 200): "
     "the evaluation text has"),
])
def test_texts_too_short_for_the_windows_are_reported_before_the_work(files, tmp_path, capsys, monkeypatch, extra,
                                                                      match):
    from saliq import calibrate as C

    monkeypatch.setattr(C, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    text = str(tmp_path / "short.txt")
    Path(text).write_text(TEXT[:150])
    _refused(capsys, ["quantize", str(files / "model"), "--out", str(tmp_path / "o"), *SMALL,
                      *[text if a == "TEXT" else a for a in extra]], match.replace("{TEXT}", text))
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_directory_without_its_config_is_still_saliq_s_and_needs_overwrite(files, rtn_ckpt, tmp_path,
                                                                                         capsys):
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(rtn_ckpt, out)
    if not any(out.glob("*manifest*.json")):
        pytest.skip("this hf.save writes no manifest")
    (out / "config.json").unlink()
    _refused(capsys, _rtn(files, out), "holds a saliq checkpoint made with other settings (differs in: unknown")
    assert main(_rtn(files, out, "--overwrite")) == 0 and hf.read_quant_config(out)["bits"] == 2


def test_demo_force_discards_only_a_folder_saliq_wrote(rtn_ckpt, tmp_path):
    import shutil

    from saliq.demo import _discard

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(rtn_ckpt, ours)
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    _discard(ours)
    _discard(theirs)
    assert not ours.exists() and (theirs / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("extra, flag", [
    (["--method", "apiq", "--calib", "TEXT", "--seqlen", "300"], "--seqlen 300"),
    (["--method", "rtn", "--eval", "TEXT", "--eval-seqlen", "257"], "--eval-seqlen 257"),
])
def test_windows_longer_than_the_model_context_are_refused_before_the_work(files, tmp_path, capsys, monkeypatch,
                                                                           extra, flag):
    from saliq import calibrate as C

    monkeypatch.setattr(C, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    text = str(files / "text.txt")
    _refused(capsys, ["quantize", str(files / "model"), "--out", str(tmp_path / "o"), *SMALL,
                      *[text if a == "TEXT" else a for a in extra]],
             f"{flag} is longer than the model's context of 256 tokens (max_position_embeddings); choose "
             f"{flag.split()[0]} <= 256")
    assert not (tmp_path / "o").exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(files, tmp_path, capsys):
    from saliq.outdir import out_lock

    out = tmp_path / "o"
    with out_lock(out):  # a run in progress (flock: a second open of the lock file conflicts, even in-process)
        _refused(capsys, _rtn(files, out), f"--out '{out}' is being written by another saliq run (pid {os.getpid()})")
        assert not out.exists()
    assert main(_rtn(files, out)) == 0  # released: the next run goes ahead
