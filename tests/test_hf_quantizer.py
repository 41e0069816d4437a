"""transformers integration: from_pretrained builds QuantLinear on the meta device and loads the verified packed
tensors; without saliq it fails instead of returning random linears; save_pretrained round-trips; model ids resolve
through the Hugging Face cache."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures_llama import make_byte_tokenizer, random_samples
from saliq import hf
from saliq.checkpoint import (INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, CheckpointError, build_manifest, module_storage,
                              verify)
from saliq.hf_quantizer import WEIGHTS_GUARD, register
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec
from quant_models import make_quant_llama as _quant_model


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfq") / "ck"
    hf.save(_quant_model(), d, make_byte_tokenizer(), method="apiq", extra={"calibration": {"epochs": 2}})
    return d


@pytest.fixture
def ck_copy(ck, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ck, d)
    return d


X = random_samples(n=2, seqlen=12)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def _reference_load(d):
    """The loader saliq had before its quantizer: a float model from the config, the listed linears replaced by
    empty QuantLinear layers, then load_state_dict (float linears materialised first)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ck = verify(d)
    qc = ck.quant_config
    cfg = {k: v for k, v in ck.config.items() if k not in ("quantization_config", "transformers_weights")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    for name, mq in qc["modules"].items():
        lin = model.get_submodule(name)
        st = module_storage(mq)  # width and storage forms of checkpoint format 2
        spec = QuantSpec(st["bits"] or qc["bits"], qc["group_size"], qc["symmetric"])
        hf.set_submodule(model, name, QuantLinear.empty(lin.in_features, lin.out_features, spec, bias=mq["bias"],
                                                        lora_rank=mq["lora_rank"], lora_alpha=mq["lora_alpha"],
                                                        dtype=torch.float32, reserved=st["reserved"],
                                                        zeros_storage=st["zeros_storage"],
                                                        reserved_dtype=st["reserved_dtype"]))
    model.load_state_dict(ck.load_tensors(), strict=False)
    model.tie_weights()
    return model.eval()


def _block_linears(model):
    return [type(m) for b in hf.decoder_blocks(model) for m in b.modules() if isinstance(m, (nn.Linear, QuantLinear))]


def test_from_pretrained_after_import_matches_the_reference_loader_bit_for_bit(ck):
    from transformers import AutoModelForCausalLM

    ref = _logits(_reference_load(ck))
    loaded, tok = hf.load(ck)
    model = AutoModelForCausalLM.from_pretrained(ck)
    for m in (loaded, model):
        assert set(_block_linears(m)) == {QuantLinear} and len(_block_linears(m)) == 14
        # loaded on the CPU, the layers keep the CPU word order (saliq/word_order.py), whose kernels read faster
        assert all(q.qweight.dim() == 1 for q in m.modules() if isinstance(q, QuantLinear))
        assert torch.equal(_logits(m), ref)
    assert type(model.config.quantization_config).__name__ == "SaliqConfig"
    assert model.config.quantization_config.method == "apiq" and model.hf_quantizer is not None
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["transformers_weights"] == WEIGHTS_GUARD
    assert (ck / "generation_config.json").is_file() and tok is not None


def test_no_float_linear_is_materialised_while_loading(ck, monkeypatch):
    """QuantLinear layers are created on the meta device: no nn.Linear gets real (CPU) weights initialised."""
    real = []
    reset = nn.Linear.reset_parameters

    def counting(self):
        real.append(not self.weight.is_meta)
        reset(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", counting)
    hf.load(ck)
    assert not any(real)
    _reference_load(ck)  # the old way initialises every float linear of the model
    assert sum(real) >= 14


@pytest.fixture
def unregistered():
    """transformers as it is without saliq: no config or quantizer for quant_method "saliq"."""
    from transformers.quantizers import auto

    saved = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("saliq"), auto.AUTO_QUANTIZER_MAPPING.pop("saliq")
    yield
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["saliq"], auto.AUTO_QUANTIZER_MAPPING["saliq"] = saved


def test_without_saliq_from_pretrained_fails_instead_of_returning_random_linears(ck, unregistered):
    from transformers import AutoModelForCausalLM

    with pytest.raises((ValueError, OSError), match="import-saliq-to-load"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_import_saliq_registers_with_transformers_and_peft_when_they_are_imported(ck):
    code = ("import sys, saliq; assert 'transformers' not in sys.modules and 'peft' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(ck)!r}); "
            "print(type(m.model.layers[0].mlp.down_proj).__name__); "
            "from peft import LoraConfig, get_peft_model; "
            "m = get_peft_model(m, LoraConfig(target_modules=['down_proj'])); "
            "print(type(m.base_model.model.model.layers[0].mlp.down_proj).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["QuantLinear", "SaliqLoraLinear"]


def test_save_pretrained_round_trips_through_saliq_load_and_from_pretrained(ck, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck)
    ref = _logits(model)
    out = tmp_path / "resaved"
    model.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / MANIFEST_NAME).is_file()
    verify(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "apiq" and qc["calibration"] == {"epochs": 2}  # informational entries kept
    assert torch.equal(_logits(hf.load(out)[0]), ref)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), ref)
    with pytest.raises(ValueError, match="state_dict"):
        model.save_pretrained(tmp_path / "x", state_dict=model.state_dict())


def test_a_model_quantized_in_memory_saves_with_save_pretrained_after_saliq_save(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _quant_model(bits=3, lora_rank=0)
    hf.save(model, tmp_path / "a", method="rtn")
    model.save_pretrained(tmp_path / "b")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), _logits(model))


def test_dequantize_gives_the_float_model_of_the_same_function(ck, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck)
    ref = _logits(model)
    dense = model.dequantize()
    assert set(_block_linears(dense)) == {nn.Linear} and getattr(dense.config, "quantization_config", None) is None
    assert (_logits(dense) - ref).norm() / ref.norm() < 1e-5
    dense.save_pretrained(tmp_path / "fp32")  # a plain transformers model again
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")), _logits(dense))


def test_dtype_and_device_map(ck):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16, device_map="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert q.scales.dtype == torch.bfloat16 and q.qweight.dtype == torch.int32 and q.zeros.dtype == torch.int16
    assert torch.equal(_logits(model), _logits(hf.load(ck, dtype=torch.bfloat16)[0]))
    ref = _logits(hf.load(ck)[0])
    assert (_logits(model).float() - ref).norm() / ref.norm() < 3e-2


def _flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def test_from_pretrained_verifies_the_manifest(ck_copy):
    from transformers import AutoModelForCausalLM

    _flip(next(ck_copy.glob("model-*.safetensors")))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        AutoModelForCausalLM.from_pretrained(ck_copy)


def test_a_stray_model_safetensors_is_never_read(ck_copy):
    from transformers import AutoModelForCausalLM

    shutil.copy(next(ck_copy.glob("model-*.safetensors")), ck_copy / SINGLE_NAME)
    with open(ck_copy / SINGLE_NAME, "r+b") as f:  # what transformers would read first, if it looked
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    ref = _logits(hf.load(ck_copy)[0])
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ck_copy)), ref)
    cfg = json.loads((ck_copy / "config.json").read_text())
    del cfg["transformers_weights"]  # a checkpoint written before the guard: transformers picks the stray file
    (ck_copy / "config.json").write_text(json.dumps(cfg))
    build_manifest(ck_copy, list(json.loads((ck_copy / MANIFEST_NAME).read_text())["files"]))
    with pytest.raises(CheckpointError, match="remove the stray files"):
        AutoModelForCausalLM.from_pretrained(ck_copy)


def test_a_single_model_safetensors_checkpoint_is_read(ck, ck_copy):
    shards = list(ck_copy.glob("model-*.safetensors"))
    assert len(shards) == 1
    shards[0].rename(ck_copy / SINGLE_NAME)
    (ck_copy / INDEX_NAME).unlink()
    cfg = json.loads((ck_copy / "config.json").read_text())
    del cfg["transformers_weights"]
    (ck_copy / "config.json").write_text(json.dumps(cfg))
    names = [n for n in json.loads((ck_copy / MANIFEST_NAME).read_text())["files"] if (ck_copy / n).exists()]
    build_manifest(ck_copy, names + [SINGLE_NAME])
    assert verify(ck_copy).weights_file == SINGLE_NAME
    assert torch.equal(_logits(hf.load(ck_copy)[0]), _logits(hf.load(ck)[0]))
    _flip(ck_copy / SINGLE_NAME)
    with pytest.raises(CheckpointError, match="model.safetensors: its sha256"):
        hf.load(ck_copy)


def _hub_cache(root: Path, repo: str, src: Path, revision="0123456789abcdef0123456789abcdef01234567") -> Path:
    """`src` laid out as the Hugging Face cache stores a downloaded repository: snapshot files are links into
    the repository's blob store."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        blob = repo_dir / "blobs" / f"blob{i:03d}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_model_ids_resolve_through_the_local_hub_cache(ck, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "saliq-test/tiny-w2", ck)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = _logits(hf.load(ck)[0])
    model, tok = hf.load("saliq-test/tiny-w2")
    assert torch.equal(_logits(model), ref) and tok is not None
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained("saliq-test/tiny-w2", cache_dir=cache)), ref)
    # links into the blob store are followed; a link leaving the repository is not
    (snap / "config.json").unlink()
    outside = tmp_path / "config.json"
    shutil.copy(ck / "config.json", outside)
    (snap / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        hf.load("saliq-test/tiny-w2")


def test_register_is_idempotent():
    from transformers.quantizers import auto

    assert register() == register()
    assert auto.AUTO_QUANTIZER_MAPPING["saliq"] is register()[1]
