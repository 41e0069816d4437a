import json

import pytest
import torch

from fixtures_llama import make_byte_tokenizer, make_tiny_llama, random_samples
from saliq import hf
from saliq.nn import FakeQuantLinear, QuantLinear
from saliq.spec import QuantSpec


def _fake_quant_model(spec, lora_rank=8, seed=0):
    """Tiny Llama whose block linears are FakeQuantLinear with non-trivial clipping and LoRA."""
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(seed)
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            fq = FakeQuantLinear.from_linear(lin, spec, lora_rank=lora_rank, lora_alpha=16)
            with torch.no_grad():
                fq.hi.copy_(torch.rand(fq.hi.shape, generator=g) * 4)
                fq.lo.copy_(torch.rand(fq.lo.shape, generator=g) * 4)
                if lora_rank:
                    fq.lora_B.normal_(0, 0.01, generator=g)
            hf.set_submodule(block, name, fq)
    return model


def _pack(model):
    for block in hf.decoder_blocks(model):
        for name, m in list(block.named_modules()):
            if isinstance(m, FakeQuantLinear):
                hf.set_submodule(block, name, m.to_quant_linear())
    return model


def _shard_dtypes(d):
    from safetensors import safe_open

    out = {}
    for f in d.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_slice(k).get_dtype()
    return {k: getattr(torch, {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "I8": "int8", "I16": "int16",
                               "I32": "int32", "U8": "uint8"}[v]) for k, v in out.items()}


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("bits,float_bits", [(2, 16), (3, 16), (4, 16), (2, 32), (3, 32)])
def test_save_load_round_trip_matches_the_fake_quant_model(tmp_path, bits, float_bits):
    spec = QuantSpec(bits=bits, group_size=32)
    x = random_samples(n=2, seqlen=16)
    model = _fake_quant_model(spec)
    fake = _logits(model, x)
    _pack(model)
    packed = _logits(model, x)
    info = hf.save(model, tmp_path, make_byte_tokenizer(), method="apiq", float_bits=float_bits)
    saved = _logits(model, x)  # save rounds the model in memory to what the checkpoint holds
    loaded, tok = hf.load(tmp_path)
    assert tok is not None and tok("ab").input_ids == make_byte_tokenizer()("ab").input_ids
    assert torch.equal(_logits(loaded, x), saved)  # bit-identical after a round trip
    rel = ((_logits(loaded, x) - fake).norm() / fake.norm()).item()
    if float_bits == 32:
        assert torch.equal(saved, packed) and rel < 1e-5
    else:  # embeddings, norms and LoRA in fp16: about 2^-11 relative per value
        assert 1e-6 < rel < 3e-3
    st = {k: v for k, v in _shard_dtypes(tmp_path).items()}
    want = torch.float16 if float_bits == 16 else torch.float32
    assert st["model.embed_tokens.weight"] == want and st["model.layers.0.self_attn.q_proj.lora_A"] == want
    assert st["model.layers.0.self_attn.q_proj.zeros"] == torch.uint8  # in [0, 15]: two per byte
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["symmetric"], qc["method"], qc["lora_rank"], qc["lora_alpha"]) == (
        bits, 32, False, "apiq", 8, 16.0)
    assert len(qc["modules"]) == 14 and info["bytes"] == hf.checkpoint_size(tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))


def test_rtn_checkpoint_without_lora_and_with_shards(tmp_path):
    model = make_tiny_llama()
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            hf.set_submodule(block, name, QuantLinear.from_linear(lin, QuantSpec(2, 32)))
    x = random_samples(n=1, seqlen=8)
    hf.save(model, tmp_path, method="rtn", max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded, tok = hf.load(tmp_path)
    assert tok is None
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_packed_size_is_bits_over_8_per_weight_plus_scales(tmp_path):
    from saliq.cli import describe_checkpoint

    spec = QuantSpec(bits=2, group_size=32)
    model = _fake_quant_model(spec, lora_rank=0)
    for block in hf.decoder_blocks(model):  # scales rounded to fp16, as calibration does by default
        for name, m in list(block.named_modules()):
            if isinstance(m, FakeQuantLinear):
                hf.set_submodule(block, name, m.to_quant_linear(scale_dtype=torch.float16))
    hf.save(model, tmp_path)
    info = describe_checkpoint(tmp_path)
    n_weights = sum(l.in_features * l.out_features for b in hf.decoder_blocks(model)
                    for l in b.modules() if isinstance(l, QuantLinear))
    assert info["quantized_weights"] == n_weights
    scales_and_zeros = n_weights / 32 * (2 + 0.5)  # fp16 scale and a 4-bit zero per group, exact
    assert info["packed_bytes"] == pytest.approx(n_weights * 2 / 8 + scales_and_zeros, rel=0.02)
    assert info["bits_per_weight"] == pytest.approx(8 * info["packed_bytes"] / n_weights)  # nothing else stored
    assert info["bits_by_part"]["scales_bits"] == pytest.approx(0.5) and info["layers_by_bits"] == {2: 14}


@pytest.fixture
def checkpoint(tmp_path):
    model = _pack(_fake_quant_model(QuantSpec(2, 32)))
    hf.save(model, tmp_path / "ck", make_byte_tokenizer(), method="saliq")
    return tmp_path / "ck"


def _edit_config(ck, fn, resign=True):
    """Edit config.json; resign: update the manifest too (a consistent checkpoint that does not match its model),
    otherwise the edit is damage the manifest must catch."""
    cfg = json.loads((ck / "config.json").read_text())
    fn(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    if resign:
        from saliq.checkpoint import MANIFEST_NAME, build_manifest

        build_manifest(ck, list(json.loads((ck / MANIFEST_NAME).read_text())["files"]))


@pytest.mark.parametrize("damage, match", [
    (lambda ck: _flip_a_byte(next(ck.glob("model-*.safetensors"))), "sha256 does not match"),
    (lambda ck: next(ck.glob("model-*.safetensors")).unlink(), "missing"),
    (lambda ck: (ck / "config.json").write_text("{not json"), "config.json: 9 bytes, the manifest says"),
    (lambda ck: _edit_config(ck, lambda c: c["quantization_config"].update(lora_alpha=160.0), resign=False),
     "config.json: .*(sha256 does not match|the manifest says)"),
    (lambda ck: _edit_config(ck, lambda c: c["quantization_config"]["modules"][
        "model.layers.0.mlp.up_proj"].update(bits=3)), "shape"),
    (lambda ck: _edit_config(ck, lambda c: c["quantization_config"].update(format_version=99)), "format version 99"),
    (lambda ck: _edit_config(ck, lambda c: c.update(num_hidden_layers=3)), "missing"),
    (lambda ck: _edit_config(ck, lambda c: c.pop("quantization_config")), "not a saliq checkpoint"),
])
def test_corrupt_or_mismatched_checkpoints_fail_loudly(checkpoint, damage, match):
    damage(checkpoint)
    with pytest.raises(hf.CheckpointError, match=match):
        hf.load(checkpoint)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_model_dispatches_on_the_path(tmp_path, checkpoint):
    model, _ = hf.load_model(checkpoint)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(FileNotFoundError, match=".gguf"):
        hf.load_model(tmp_path / "nothing")


def test_block_inputs_reproduce_the_model():
    tiny_llama = make_tiny_llama()
    x = random_samples(n=2, seqlen=12)
    hidden, kwargs = hf.capture_block_inputs(tiny_llama, x)
    for block in hf.decoder_blocks(tiny_llama):
        hidden = hf.run_block(block, hidden, kwargs)
    with torch.no_grad():
        logits = tiny_llama.lm_head(hf.final_norm(tiny_llama)(hidden))
    assert torch.allclose(logits, _logits(tiny_llama, x), atol=1e-5)


def test_a_format_1_checkpoint_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before format 2 stored every tensor as in memory and had no per-module widths."""
    from saliq import checkpoint, storage

    model = _pack(_fake_quant_model(QuantSpec(3, 32)))
    x = random_samples(n=1, seqlen=8)
    with monkeypatch.context() as m:  # the writer of format 1
        m.setattr(storage, "stored_form", lambda name, t, float_bits=16: t)
        m.setattr(checkpoint, "CHECKPOINT_FORMAT", 1)
        hf.save(model, tmp_path / "ck", make_byte_tokenizer())

    def as_format_1(cfg):
        qc = cfg["quantization_config"]
        assert qc["format_version"] == 1
        for entry in qc["modules"].values():
            for key in ("bits", "zeros_dtype"):
                entry.pop(key)

    _edit_config(tmp_path / "ck", as_format_1)
    assert _shard_dtypes(tmp_path / "ck")["model.layers.0.mlp.up_proj.zeros"] == torch.int16
    loaded, _ = hf.load(tmp_path / "ck")
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert loaded.model.layers[1].mlp.down_proj.spec.bits == 3
