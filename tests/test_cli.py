import json

import pytest

from fixtures_llama import text_file, tiny_model_dir  # noqa: F401  (pytest fixtures)
from saliq import hf
from saliq.cli import build_parser, main

SMALL = ["--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--lora-rank", "8", "--no-progress"]


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_quantize_eval_info_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["quantize", str(tiny_model_dir), "--method", "saliq", "--bits", "2", "--calib", str(text_file),
               "--epochs", "1", "--out", str(out), "--eval", str(text_file), "--eval-seqlen", "64", "--json", *SMALL])
    assert rc == 0
    res = _last_json(capsys)
    assert res["method"] == "saliq" and res["bytes"] > 0 and res["perplexity"] > 1 and len(res["block_seconds"]) == 2
    assert (out / "calibration_log.jsonl").is_file() and not (out / ".calib").exists()
    calib = hf.read_quant_config(out)["calibration"]
    assert (calib["clip_init"], calib["after_lora"]) == ("search", True)  # saliq's defaults

    assert main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--json", "--no-progress"]) == 0
    ev = _last_json(capsys)
    assert set(ev) >= {"perplexity", "tokens"} and ev["tokens"] == (len(text_file.read_text()) // 64) * 64
    assert ev["perplexity"] == pytest.approx(res["perplexity"], rel=1e-4)

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "saliq W2 g32" in text and "bits/weight" in text


def test_saliency_command_output_is_reused_by_quantize(tiny_model_dir, text_file, tmp_path, capsys):
    sal = tmp_path / "s.safetensors"
    assert main(["saliency", str(tiny_model_dir), "--calib", str(text_file), "--out", str(sal), "--nsamples", "2",
                 "--seqlen", "32", "--no-progress"]) == 0
    assert sal.is_file()
    capsys.readouterr()
    assert main(["quantize", str(tiny_model_dir), "--calib", str(text_file), "--saliency", str(sal), "--epochs", "1",
                 "--clip-init", "fixed", "--init-logit", "3", "--no-after-lora", "--out", str(tmp_path / "ck"), *SMALL]) == 0
    assert "reusing" in capsys.readouterr().err
    calib = hf.read_quant_config(tmp_path / "ck")["calibration"]
    assert calib["clip_init"] == "fixed" and calib["init_logit"] == 3.0 and calib["after_lora"] is False


@pytest.mark.parametrize("argv, match", [
    (["quantize", "MISSING", "--out", "o", "--calib", "TEXT"], "does not exist"),
    (["quantize", "MODEL", "--out", "o", "--method", "apiq"], "needs calibration text"),
    (["quantize", "MODEL", "--out", "o", "--calib", "nope.txt"], "is not a file"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--schedule", "wpt1"], "STAGE:EPOCHS"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--method", "apiq", "--schedule", "wpt:1"], "opt' only"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--nsamples", "0"], "--nsamples=0 must be >= 1"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--device", "cuda:0"], "CUDA is not available|--device"),
    (["eval", "MODEL", "--text", "TEXT", "--seqlen", "1"], "--seqlen=1"),
    (["info", "MODEL"], "not a saliq checkpoint"),
    (["demo", "--methods", "rtn,gptq"], "unknown"),
])
def test_bad_arguments_exit_2_with_a_message_that_says_what_to_do(argv, match, tiny_model_dir, text_file, capsys):
    argv = [str(tiny_model_dir) if a == "MODEL" else str(text_file) if a == "TEXT" else a for a in argv]
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_argparse_rejects_values_outside_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "m", "--out", "o", "--bits", "5"])
    assert exc.value.code == 2 and "invalid choice: 5" in capsys.readouterr().err


def test_group_size_that_does_not_divide_the_layer_is_an_error_not_a_crash(tiny_model_dir, text_file, tmp_path,
                                                                            capsys):
    rc = main(["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "128", "--out",
               str(tmp_path / "o"), "--no-progress"])
    assert rc == 1 and "group_size=128 does not divide in_features=64" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["quantize", "eval", "saliency", "info", "demo"])
def test_every_command_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: saliq " + command in text
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.help is not None and action.option_strings:
            assert action.help, action.option_strings
