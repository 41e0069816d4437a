"""`saliq generate` and saliq.generate on the tiny random Llama (a float directory and a saliq checkpoint): the
streamed text is transformers' own greedy (or seeded sampling) result, the closing line reports the speeds, bad
arguments stop with one line; and benchmarks/generate_cpu.py's smoke run yields well-formed records."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fixtures_llama import make_byte_tokenizer, tiny_model_dir  # noqa: F401  (pytest fixture)
from quant_models import make_quant_llama
from saliq import hf
from saliq.cli import main
from saliq.generate import generate_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generate_cpu  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def tiny_ckpt(tmp_path):
    d = tmp_path / "ckpt"
    hf.save(make_quant_llama(), d, make_byte_tokenizer(), method="rtn")
    return d


def _greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _json_line(capsys):
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.parametrize("which", ["float", "saliq"])
def test_streams_the_greedy_tokens_of_model_generate(which, tiny_model_dir, tiny_ckpt, capsys):
    path = tiny_model_dir if which == "float" else tiny_ckpt
    assert main(["generate", str(path), "--prompt", "Alice was", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    model, tok = hf.load_model(path)
    expected = tok.decode(_greedy(model, tok, "Alice was", 12), skip_special_tokens=True)
    assert captured.out == expected + "\n"  # the streamed text, then the streamer's closing newline
    last = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(r"prompt 9 tokens, prefill [\d.]+ tokens/s \([\d.]+ s\); 12 new tokens, 11 decode steps at "
                        r"[\d.]+ tokens/s \([\d.]+ s\); stopped: --max-new-tokens reached", last), last
    assert ("saliq checkpoint" if which == "saliq" else "float model") in captured.err


def test_json_result_and_seeded_sampling(tiny_ckpt, capsys):
    argv = ["generate", str(tiny_ckpt), "--prompt", "The", "--max-new-tokens", "16", "--temperature", "0.9",
            "--top-p", "0.95", "--seed", "7", "--json"]
    assert main(argv) == 0
    first, err = _json_line(capsys)
    assert first["text"] in err  # --json streams the text to stderr
    assert main(argv) == 0
    again, _ = _json_line(capsys)
    assert first["text"] == again["text"]
    assert first["kind"] == "saliq" and first["new_tokens"] == 16 and first["prompt_tokens"] == 3
    assert first["stop"] == "length" and first["decode_tokens_per_s"] > 0 and first["prefill_tokens_per_s"] > 0


def test_chat_wraps_the_prompt_in_the_template(tiny_model_dir, capsys):
    tok = make_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tiny_model_dir)
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hi", "--chat", "--max-new-tokens", "2", "--json"]) == 0
    res, _ = _json_line(capsys)
    assert res["prompt_tokens"] == len("<user>Hi</user><assistant>")


def test_stops_at_an_end_of_sequence_token(tiny_ckpt):
    model, tok = hf.load(tiny_ckpt)
    first = _greedy(model, tok, "Alice", 1)[0]
    model.generation_config.eos_token_id = first  # the first greedy token ends the sequence
    res = generate_text(model, tok, "Alice", max_new_tokens=10, out=None)
    assert (res.new_tokens, res.stop, res.token_ids) == (1, "eos", [first])
    assert res.prefill_seconds > 0 and res.decode_seconds == 0 and "no decode steps" in res.summary()


@pytest.mark.parametrize("argv,match", [
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--max-new-tokens", "300"], r"--max-new-tokens=300: the prompt \(5 tokens\) plus the new tokens exceed the "
     r"model's context of 256 tokens; allowed: at most 251"),
    (["--temperature", "-0.5"], r"--temperature=-0\.5 must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature=nan must be a finite number"),
    (["--top-p", "0"], r"--top-p=0\.0 must be a finite number > 0 and <= 1"),
    (["--top-p", "1.5"], r"--top-p=1\.5 must be a finite number > 0 and <= 1"),
    (["--seed", "-1"], "--seed=-1 must be >= 0"),
    (["--threads", "0"], "--threads=0 must be >= 1"),
    (["--chat"], "--chat: the tokenizer of .* has no chat template; drop --chat"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, match, tiny_model_dir, capsys):
    full = ["generate", str(tiny_model_dir), "--prompt", "Alice", *argv]
    with pytest.raises(SystemExit) as exc:
        main(full)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and re.search(match, lines[0]) and "Traceback" not in err, err


def test_missing_model_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_benchmark_smoke_run_records_every_model():
    res = generate_cpu.main(["--smoke", "--rounds", "1", "--new-tokens", "4", "--prompt-tokens", "4",
                             "--prefill-tokens", "8", "--threads", "1", "--no-memory"])
    assert set(res["models"]) == {"fp32", "bf16", "saliq", "saliq generate"}
    for kind in ("fp32", "bf16", "saliq"):
        entry = res["models"][kind]
        assert entry["decode_tokens_per_s"] > 0 and entry["prefill_tokens_per_s"] > 0
    assert set(res["ratios"]) == {f"{a} / {b} decode" for a in ("saliq", "saliq generate") for b in ("fp32", "bf16")}
    assert res["machine"]["threads"] == 1 and res["machine"]["cpus"] >= 1


def test_benchmark_memory_probe_reports_peak_rss(capsys):
    generate_cpu.main(["--smoke", "--memory-of", "saliq", "--new-tokens", "2", "--prompt-tokens", "4", "--threads",
                       "1"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["peak_rss_bytes"] > rec["tensor_bytes"] > 0


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "usage: saliq generate" in text
    for flag in ("--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--chat", "--dtype", "--threads",
                 "--device", "--json", "--debug"):
        assert flag in text, flag
