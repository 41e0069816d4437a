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
    assert "saliq W2 g32" in text and "bits per quantized weight, everything counted" in text


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
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--nsamples", "-3"], "--nsamples=-3 must be >= 1"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--seqlen", "-1"], "--seqlen=-1 must be >= 2"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--epochs", "-1"], "--epochs=-1 must be >= 0"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--batch-size", "0"], "--batch-size=0 must be >= 1"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lora-rank", "-8"], "--lora-rank=-8 must be >= 0"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lr-clip", "-0.001"],
     r"--lr-clip=-0\.001 must be a finite number >= 0"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lr-clip", "nan"], "--lr-clip=nan must be a finite"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lr-lora", "-0.0001"], "--lr-lora=-0.0001 must be"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lr-lora", "inf"], "--lr-lora=inf must be a finite"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--weight-decay", "-0.1"], "--weight-decay=-0.1 must"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lambda-reg", "-0.1"], "--lambda-reg=-0.1 must be"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lambda-reg", "inf"], "--lambda-reg=inf must be"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--lora-alpha", "0"], "--lora-alpha=0.0 must be a finite "
     "number > 0"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--init-logit", "nan"], "--init-logit=nan must be"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--block-multipliers", "1,-1"],
     r"--block-multipliers value=-1\.0 must be a finite number >= 0"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--block-multipliers", "1,2,3"],
     "--block-multipliers has 3 values; the model has 2 decoder blocks"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--eval-max-tokens", "-5"], "--eval-max-tokens=-5"),
    (["saliency", "MODEL", "--out", "s.safetensors", "--calib", "TEXT", "--nsamples", "-1"], "--nsamples=-1"),
    (["quantize", "MODEL", "--out", "o", "--calib", "TEXT", "--device", "cuda:0"], "CUDA is not available|--device"),
    (["eval", "MODEL", "--text", "TEXT", "--seqlen", "1"], "--seqlen=1"),
    (["info", "MODEL"], "not a saliq checkpoint"),
    (["demo", "--methods", "rtn,gptq"], "unknown"),
])
def test_bad_arguments_exit_2_with_a_message_that_says_what_to_do(argv, match, tiny_model_dir, text_file, capsys,
                                                                  tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tiny_model_dir) if a == "MODEL" else str(text_file) if a == "TEXT" else a for a in argv]
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_argparse_rejects_values_outside_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "m", "--out", "o", "--bits", "5"])
    assert exc.value.code == 2 and "invalid choice: 5" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["rtn", "saliq"])
def test_group_size_that_does_not_divide_the_layer_is_refused_before_any_work(method, tiny_model_dir, text_file,
                                                                              tmp_path, capsys, monkeypatch):
    from saliq import saliency

    monkeypatch.setattr(saliency, "compute_saliency", lambda *a, **k: pytest.fail("the saliency pass ran"))
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_model_dir), "--method", method, "--group-size", "128", "--out", str(tmp_path / "o"),
              "--no-progress", *(["--calib", str(text_file)] if method != "rtn" else [])])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--group-size 128 does not divide in_features=64 of model.layers.0.self_attn.q_proj" in err
    assert "group sizes that fit this model: 32, 64, -1" in err
    assert not (tmp_path / "o").exists()


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


def test_quantize_with_reserved_weights_bit_budget_and_low_rank_in_the_grid(tiny_model_dir, text_file, tmp_path,
                                                                           capsys):
    out = tmp_path / "ck"
    rc = main(["quantize", str(tiny_model_dir), "--method", "saliq", "--bits", "2", "--calib", str(text_file),
               "--epochs", "1", "--out", str(out), "--eval", str(text_file), "--eval-seqlen", "64", "--json",
               "--reserve-fraction", "0.01", "--bit-budget", "2.5", "--lora-in-grid", "--sw-weight", "0.5", *SMALL])
    assert rc == 0
    res = _last_json(capsys)
    assert res["perplexity"] > 1
    assert main(["info", str(out), "--json"]) == 0
    info = _last_json(capsys)
    assert info["bits_by_part"]["reserved_bits"] > 0 and info["bits_by_part"]["lora_bits"] == 0
    assert set(info["layers_by_bits"]) == {"2", "3"}  # JSON object keys
    # g32: 2.5 code bits + 0.75 for fp16 scales and int8 zeros + reserved (1% at 32 bits, 32-bit row pointers)
    assert 3.25 < info["bits_per_weight"] < 4.5
    # the evaluation after saving is the evaluation of the checkpoint
    assert main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--json", "--no-progress"]) == 0
    assert _last_json(capsys)["perplexity"] == pytest.approx(res["perplexity"], rel=1e-4)
