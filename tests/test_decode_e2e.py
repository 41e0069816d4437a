"""benchmarks/decode_e2e.py on the CPU: the functional static-cache decoder matches HF's own forward (dense and
QuantLinear models), its greedy tokens and rewind behave, and the --smoke run yields well-formed records."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_e2e  # noqa: E402

pytest.importorskip("transformers")


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, name: str = "logits") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
    assert err <= rel, f"{name}: max abs error / max |ref| = {err:.3e} > {rel:.0e}"


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _decode(model, batch=2, prompt_len=5, steps=4, chunk=None, seed=0):
    """Prefill + `steps` greedy decode steps; returns (decoder, logits of every position [B, P+steps, V])."""
    cfg = model.config
    dec = decode_e2e.StaticDecoder(model, batch, decode_e2e._max_len(prompt_len, steps))
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    logits = [dec.prefill(prompt, chunk=chunk)]
    for _ in range(steps):
        logits.append(dec.decode_step())
    return dec, torch.cat(logits, dim=1)


def _check_against_hf(model, batch=2, prompt_len=5, steps=4):
    dec, logits = _decode(model, batch, prompt_len, steps)
    total = prompt_len + steps
    assert int(dec.pos) == total
    seq = dec.generated[:, :total]
    ref = _hf_logits(model, seq)
    _close(logits, ref)
    # the greedy tokens are the argmax of HF's logits at the previous position
    greedy = ref[:, prompt_len - 1:].argmax(-1)
    assert torch.equal(dec.generated[:, prompt_len:total + 1], greedy)


@pytest.mark.parametrize("overrides", [{}, {"rope_theta": 500000.0}], ids=["default", "rope_theta"])
def test_dense_matches_hf_forward(overrides):
    cfg = decode_e2e.make_config(smoke=True, **overrides)
    if overrides:
        assert decode_e2e.rope_theta_of(cfg) == overrides["rope_theta"]
    model = decode_e2e.build_model(cfg, None, device="cpu", dtype=torch.float32)
    _check_against_hf(model)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_linear_model_matches_hf_forward(bits):
    from saliq.nn import QuantLinear

    cfg = decode_e2e.make_config(smoke=True)
    model = decode_e2e.build_model(cfg, bits, 64, device="cpu", dtype=torch.float32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 7 * cfg.num_hidden_layers
    assert all(m.spec.bits == bits and m.spec.group_size == 64 for m in quant)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    for q in quant:  # random codes, scales in [0.001, 0.02], zero points in [0, 2^bits - 1]
        assert q.scales.min() >= 0.001 - 1e-6 and q.scales.max() <= 0.02 + 1e-6
        assert q.zeros.min() >= 0 and q.zeros.max() <= (1 << bits) - 1
    _check_against_hf(model, batch=1)
    _check_against_hf(model, batch=3, prompt_len=4, steps=3)


def test_chunked_prefill_and_rewind():
    cfg = decode_e2e.make_config(smoke=True)
    model = decode_e2e.build_model(cfg, 4, 64, device="cpu", dtype=torch.float32)
    dec_a, logits_a = _decode(model, chunk=None)
    dec_b, logits_b = _decode(model, chunk=1)
    _close(logits_b, logits_a, rel=1e-5, name="token-by-token prefill")
    assert torch.equal(dec_a.generated, dec_b.generated)
    # rewinding to the end of the prompt replays the same greedy tokens (what the graph replay relies on)
    P = 5
    tokens = dec_a.generated[:, P:P + 1].clone()
    before = dec_a.generated.clone()
    dec_a.rewind(P, tokens)
    for _ in range(4):
        dec_a.decode_step()
    assert torch.equal(dec_a.generated, before)


def test_model_weights_are_initialised():
    cfg = decode_e2e.make_config(smoke=True)
    model = decode_e2e.build_model(cfg, None, device="cpu", dtype=torch.float32)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert 0.015 < p.std().item() < 0.025, name
    assert decode_e2e.inv_freq_of(cfg).shape == (cfg.head_dim // 2,)


def test_grouped_query_attention_is_rejected():
    cfg = decode_e2e.make_config(smoke=True, num_key_value_heads=2)
    with pytest.raises(NotImplementedError, match="grouped-query"):
        decode_e2e.build_model(cfg, None, device="cpu", dtype=torch.float32)


def test_llama2_7b_config_shape():
    cfg = decode_e2e.make_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.vocab_size) == (4096, 11008, 32, 32, 32000)
    assert decode_e2e.head_dim_of(cfg) == 128 and decode_e2e.rope_theta_of(cfg) == 10000.0
    assert decode_e2e._linear_shape(cfg, "down_proj") == (4096, 11008)
    assert decode_e2e._linear_shape(cfg, "gate_proj") == (11008, 4096)


def test_run_smoke_records():
    records = decode_e2e.run([2, 4], [1, 2], new_tokens=4, smoke=True, verbose=False)
    assert [(r["bits"], r["M"]) for r in records] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    for r in records:
        assert r["op"] == "decode" and r["group"] == 64 and r["N"] is None and r["K"] is None
        assert r["dtype"] == "float32"
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_fp16"] > 0
        assert r["x_fp16"] == pytest.approx(r["tokens_per_s"] / r["tokens_per_s_fp16"])
        assert "peak_gib" in r and "peak_gib_fp16" in r
        assert r["finite"] and r["cuda_graph"] is False
    table = decode_e2e.markdown(records)
    assert table.count("\n") == 2 + len(records) and "x fp16" in table


def test_cli_smoke(tmp_path, capsys):
    path = tmp_path / "decode.json"
    assert decode_e2e.main(["--smoke", "--bits", "3", "--batch", "1", "--new-tokens", "3", "--json",
                            str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["smoke"] is True
    assert [(r["bits"], r["M"]) for r in data["records"]] == [(3, 1)]
    assert "| 3 | 1 |" in capsys.readouterr().out


def test_normal_mode_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        decode_e2e.run([2], [1], new_tokens=1)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 3])
def test_cuda_graph_decode_matches_hf(bits):
    """The captured decode step, replayed, generates HF's greedy tokens (tiny model, fp32, on the GPU)."""
    cfg = decode_e2e.make_config(smoke=True)
    model = decode_e2e.build_model(cfg, bits, 64, device="cuda", dtype=torch.float32)
    prompt_len, new_tokens = 6, 8
    out = decode_e2e.measure_decode(model, 2, new_tokens, prompt_len, use_graph=True)
    assert out["cuda_graph"] and out["graph_matches_eager"] and out["finite"]
    seq = out["tokens"].cuda()  # prompt, first token from the prefill, then one per replay
    assert seq.shape == (2, prompt_len + 1 + new_tokens)
    ref = _hf_logits(model, seq[:, :-1])
    assert torch.equal(seq[:, prompt_len:], ref[:, prompt_len - 1:].argmax(-1))
