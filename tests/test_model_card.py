"""Provenance in `--json` results and the model card: what a figure was computed from, and a README.md that a
checkpoint carries without the loader reading it."""
import hashlib
import json

from fixtures_llama import TEXT, make_byte_tokenizer
from quant_models import make_quant_llama
from saliq import hf
from saliq.cli import main
from saliq.pipeline import describe_checkpoint

LM_EVAL_RESULTS = {  # the parts of lm-eval's results JSON the card reads
    "results": {"piqa": {"alias": "piqa", "acc,none": 0.6123, "acc_stderr,none": 0.0114, "acc_norm,none": 0.6201,
                         "acc_norm_stderr,none": 0.0113}},
    "configs": {"piqa": {}}, "n-shot": {"piqa": 0}, "config": {"limit": None},
}


def test_eval_json_records_provenance_and_the_card_tabulates_results(tmp_path, capsys):
    ck = tmp_path / "ck"
    hf.save(make_quant_llama(bits=2, lora_rank=4), ck, make_byte_tokenizer(), method="apiq")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["eval", str(ck), "--text", str(text), "--seqlen", "64", "--json", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(line)
    prov = res["provenance"]
    assert prov["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest() and prov["seqlen"] == 64
    assert prov["manifest_sha256"] == hashlib.sha256((ck / "saliq-manifest.json").read_bytes()).hexdigest()
    assert prov["quantization"]["bits"] == 2 and {"saliq", "torch", "transformers"} <= set(prov["versions"])
    (tmp_path / "ppl.json").write_text(line + "\n")
    (tmp_path / "lm_eval.json").write_text(json.dumps(LM_EVAL_RESULTS))

    assert main(["card", str(ck), "--results", str(tmp_path / "lm_eval.json"), str(tmp_path / "ppl.json")]) == 0
    card = (ck / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- 2-bit" in card and "- apiq" in card
    assert "| piqa | acc | 0.6123 | 0.0114 | 0 |  |" in card and "| piqa | acc_norm | 0.6201 |" in card
    assert f"| text.txt | {prov['text_sha256'][:12]} | 64 | {res['tokens']} | {res['perplexity']:.3f} |" in card
    assert "import saliq" in card and "AutoModelForCausalLM.from_pretrained" in card
    # the card is not part of the checkpoint: the loader ignores it, info reports it, a re-save keeps it
    assert describe_checkpoint(ck)["extra_files"] == ["README.md"]
    model, _ = hf.load(ck)
    hf.save(model, ck)
    assert (ck / "README.md").read_text() == card


def test_card_refuses_results_it_cannot_read(tmp_path, capsys):
    ck = tmp_path / "ck"
    hf.save(make_quant_llama(bits=2, lora_rank=0), ck, method="rtn")
    (tmp_path / "x.json").write_text('{"something": 1}')
    assert main(["card", str(ck), "--results", str(tmp_path / "x.json")]) == 1
    assert "neither lm-eval results JSON" in capsys.readouterr().err and not (ck / "README.md").exists()
