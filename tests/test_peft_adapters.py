"""PEFT: the calibrated LoRA leaves a checkpoint as a standard adapter that reproduces it on the LoRA-free base,
and QuantLinear layers take PEFT LoRA adapters for further fine-tuning (only the adapters train)."""
import json

import pytest
import torch

from fixtures_llama import make_byte_tokenizer, random_samples
from saliq import hf
from saliq.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from saliq.cli import main
from saliq.nn import QuantLinear
from quant_models import make_quant_llama as _quant_model


X = random_samples(n=2, seqlen=12)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    hf.save(_quant_model(bits=3, lora_rank=4), root / "ck", make_byte_tokenizer(), method="saliq")
    assert main(["export-adapter", str(root / "ck"), str(root / "adapter"), "--json"]) == 0
    return root / "ck", root / "adapter"


def test_the_exported_adapter_on_its_base_computes_the_checkpoint(exported):
    from peft import AutoPeftModelForCausalLM, PeftModel

    ck, adapter = exported
    cfg = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 16.0)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    assert (adapter / ADAPTER_WEIGHTS_NAME).is_file() and cfg["base_model_name_or_path"] == str(
        (adapter / "base").resolve())
    ref = _logits(hf.load(ck)[0])
    base, _ = hf.load(adapter / "base")
    assert all(m.lora_A is None for m in base.modules() if isinstance(m, QuantLinear))
    assert not torch.equal(_logits(base), ref)  # the adapter matters
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, adapter)), ref, rtol=1e-5, atol=1e-5)
    # the standard one-liner: base_model_name_or_path names the saliq base, which the quantizer loads
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    torch.testing.assert_close(_logits(auto), ref, rtol=1e-5, atol=1e-5)


def test_one_optimizer_step_changes_only_the_adapter(exported):
    from peft import PeftModel

    _, adapter = exported
    model = PeftModel.from_pretrained(hf.load(adapter / "base")[0], adapter, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=X, labels=X).loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}


def test_get_peft_model_puts_a_fresh_lora_on_quantlinear(exported):
    from peft import LoraConfig, get_peft_model

    from saliq.peft_support import SaliqLoraLinear

    ck, _ = exported
    model, _ = hf.load(ck)
    ref = _logits(model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = [m for m in pm.modules() if isinstance(m, SaliqLoraLinear)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, QuantLinear) for m in layers)
    assert torch.equal(_logits(pm), ref)  # B starts at zero; the calibrated LoRA inside QuantLinear stays
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        pm(input_ids=X, labels=X).loss.backward()
        opt.step()
    assert not torch.equal(_logits(pm), ref)
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()


def test_export_adapter_refuses_a_checkpoint_without_lora_and_a_used_directory(tmp_path, capsys):
    hf.save(_quant_model(lora_rank=0), tmp_path / "rtn", method="rtn")
    assert main(["export-adapter", str(tmp_path / "rtn"), str(tmp_path / "a")]) == 1
    assert "no LoRA" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["export-adapter", str(tmp_path / "rtn"), str(tmp_path / "used")])
    assert exc.value.code == 2 and "not an empty directory" in capsys.readouterr().err
