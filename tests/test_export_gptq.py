"""GPTQ export: the packed layout read back by a GPTQ dequantizer written here from the format's definition (bit
offsets in each column's bit string, v1 zero points stored minus one) gives saliq's weights bit for bit; zero points
GPTQ cannot hold are moved exactly, refused, or re-fitted and reported; the export plus its adapter computes the
checkpoint's outputs."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_llama import make_byte_tokenizer, random_samples
from quant_models import make_quant_llama
from saliq import hf, ref
from saliq.cli import main
from saliq.export_gptq import GPTQExportError, export_gptq, fit_zero_points, pack_bits
from saliq.nn import QuantLinear
from saliq.packing import pack_weight, unpack
from saliq.spec import QuantSpec


# ---------------------------------------------------------------- a GPTQ reader, from the format's definition
def _bits_of(words: torch.Tensor) -> torch.Tensor:
    """int32 words [W, C] -> bits [W * 32, C], least significant bit of the first word first."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(w >> b) & 1 for b in range(32)], dim=1).reshape(-1, words.shape[1])


def _values(bits: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first `count` values of `width` bits from a bit string [L, C] -> [count, C]."""
    v = bits[: count * width].reshape(count, width, -1)
    return sum(v[:, j] << j for j in range(width))


def gptq_dequantize(t: dict, bits: int, in_features: int, fmt: str = "gptq") -> torch.Tensor:
    """W [N, K] (fp32) of one GPTQ linear: (q - z) * scale of group g_idx[k], z = stored zero + 1 in v1 ("gptq"),
    the stored zero in v2."""
    q = _values(_bits_of(t["qweight"]), bits, in_features)                         # [K, N]
    n = t["qweight"].shape[1]
    z = _values(_bits_of(t["qzeros"].t().contiguous()), bits, n).t() + (1 if fmt == "gptq" else 0)  # [G, N]
    g = t["g_idx"].long()
    s = t["scales"].float()
    return ((q - z[g]).float() * s[g]).t()


def _saliq_weight_fp16_scales(m: QuantLinear) -> torch.Tensor:
    """saliq's dequantized weight with its scales rounded to float16, as the export stores them."""
    p = m.packed
    return ref.dequantize(p.qweight, p.qweight_hi, p.scales.half().float(), p.zeros, p.bits, p.group_size,
                          p.in_features)


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bits_is_the_column_bit_string(bits):
    v = torch.randint(0, 1 << bits, (5, 96))
    words = pack_bits(v, bits)
    assert words.shape == (5, 96 * bits // 32) and words.dtype == torch.int32
    assert torch.equal(_values(_bits_of(words.t().contiguous()), bits, 96).t(), v)


@pytest.mark.parametrize("bits", [2, 4])
def test_saliq_qweight_already_has_gptqs_layout_at_2_and_4_bits(bits):
    q = torch.randint(0, 1 << bits, (64, 128))
    p = pack_weight(q, torch.rand(64, 4) + 0.1, torch.randint(0, 1 << bits, (64, 4)), QuantSpec(bits, 32))
    assert torch.equal(pack_bits(q, bits).t(), p.qweight)


# ---------------------------------------------------------------- zero points
def _layer(bits, q, z, s):
    """A QuantLinear from levels q [N, K], zero points z [N, G] and scales s [N, G]."""
    return QuantLinear(pack_weight(q, s, z, QuantSpec(bits, 32)), spec=QuantSpec(bits, 32))


def test_zero_points_outside_gptqs_range_move_exactly_or_are_refused_or_refitted():
    bits, qmax = 2, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, qmax + 1, (32, 64), generator=g)
    z = torch.randint(1, qmax + 1, (32, 2), generator=g)
    s = torch.rand(32, 2, generator=g) + 0.05
    q[0, :32] = torch.randint(0, qmax, (32,), generator=g)  # levels 0..2 leave room above
    q[0, 0] = 0
    z[0, 0] = 0                                               # z = 0: stored -1 in v1; moved to z = 1, q + 1
    q[1, 32:] = torch.randint(1, qmax + 1, (32,), generator=g)
    q[1, 32] = qmax
    z[1, 1] = qmax + 2                                        # z = 5 > 4: moved down, q - 1
    q[2, :32] = torch.arange(32) % (qmax + 1)                 # every level used: nowhere to move
    z[2, 0] = -3                                              # a positive-only group (LWC gives such zero points)
    m = _layer(bits, q, z, s)
    w = _saliq_weight_fp16_scales(m)
    with pytest.raises(GPTQExportError, match=r"layer: 1 of 64 groups .*row 2, group 0: z = -3; allowed 1\.\.4"):
        fit_zero_points(unpack(m.packed.qweight, m.packed.qweight_hi, bits, 64), m.zeros.t(), m.scales.t().float(), bits, 32,
                        refit=False, name="layer")
    from saliq.export_gptq import gptq_tensors

    t, rep = gptq_tensors(m, "layer", refit=True)
    assert (rep.moved, rep.refitted) == (2, 1)
    out = gptq_dequantize(t, bits, 64)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[2, :32] = False
    assert torch.equal(out[keep], w[keep])                    # every other group, the moved ones too: exact
    changed = (out[2, :32] - w[2, :32]).norm() / w[2, :32].norm()
    assert 0 < changed < 0.5 and rep.refit_rel_error == pytest.approx(float((out - w).norm() / w.norm()), rel=1e-3)
    # v2 holds zero points 0..Q: z = 0 stays as it is, z = 5 now needs d <= -2, which level 1 forbids: re-fitted
    t, rep = gptq_tensors(m, "layer", refit=True, checkpoint_format="gptq_v2")
    assert (rep.moved, rep.refitted) == (0, 2)
    keep[1, 32:] = False
    assert torch.equal(gptq_dequantize(t, bits, 64, "gptq_v2")[keep], w[keep])


# ---------------------------------------------------------------- the checkpoint
X = random_samples(n=2, seqlen=12)


@pytest.fixture(scope="module", params=[(2, "gptq"), (3, "gptq"), (4, "gptq"), (3, "gptq_v2")], ids=str)
def exported(request, tmp_path_factory):
    bits, fmt = request.param
    root = tmp_path_factory.mktemp(f"gptq{bits}")
    hf.save(make_quant_llama(bits=bits, lora_rank=4), root / "ck", make_byte_tokenizer(), method="apiq")
    info = export_gptq(root / "ck", root / "gptq", checkpoint_format=fmt)
    return bits, fmt, root / "ck", root / "gptq", info


def _tensors(d):
    out = {}
    for f in d.glob("model-*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_every_layer_dequantizes_to_saliqs_weights_bit_for_bit(exported):
    bits, fmt, ck, out, info = exported
    model, _ = hf.load(ck)
    t = _tensors(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert info["layers"] == len(layers) == 14 and info["groups_refitted"] == 0
    for name, m in layers.items():
        lt = {k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert lt["qweight"].shape == (m.in_features * bits // 32, m.out_features)
        assert lt["qzeros"].shape == (m.in_features // 32, m.out_features * bits // 32)
        assert lt["scales"].dtype == torch.float16 and lt["g_idx"].dtype == torch.int32
        assert torch.equal(gptq_dequantize(lt, bits, m.in_features, fmt), _saliq_weight_fp16_scales(m)), name
        assert f"{name}.weight" not in t and f"{name}.lora_A" not in t
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] | {"saliq": None} == {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": fmt, "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
        "lm_head": False, "saliq": None}
    assert "transformers_weights" not in cfg and json.loads((out / "quantize_config.json").read_text())["bits"] == bits
    assert t["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" not in t  # tied


def test_the_export_and_its_adapter_compute_the_checkpoint(exported):
    """The GPTQ weights dequantized into a float Llama plus the exported adapter (PEFT) give saliq's logits up to
    the float16 rounding of scales and embeddings: names, shapes and the adapter all line up."""
    import peft  # a dev dependency (pyproject's dev extra)
    from transformers import AutoConfig, AutoModelForCausalLM

    bits, fmt, ck, out, info = exported
    saliq_model, _ = hf.load(ck)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    t = _tensors(out)
    state = {k: v.float() for k, v in t.items() if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    for name, m in saliq_model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = gptq_dequantize({k: t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales",
                                                                                     "g_idx")}, bits, m.in_features, fmt)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    dense.tie_weights()
    served = peft.PeftModel.from_pretrained(dense, out / "lora")
    with torch.no_grad():
        a, b = served(input_ids=X).logits, saliq_model(input_ids=X).logits
    assert (a - b).norm() / b.norm() < 5e-3
    with torch.no_grad(), served.disable_adapter():
        without = served(input_ids=X).logits
    assert info["lora_rank"] == 4 and not torch.allclose(without, a)  # the adapter carries the calibrated LoRA


def test_cli_export_prints_the_vllm_command_and_refuses_what_gptq_cannot_hold(tmp_path, capsys):
    model = make_quant_llama(bits=2, lora_rank=0)
    layer = model.model.layers[0].mlp.up_proj
    z = layer.zeros.clone()
    z[0, 0] = -40                                      # far outside [1, 4]; RTN levels span the whole range
    layer.zeros.copy_(z)
    hf.save(model, tmp_path / "ck", make_byte_tokenizer(), method="rtn")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "ck"), str(tmp_path / "out"), "--format", "gptq", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "model.layers.0.mlp.up_proj: 1 of" in err[0]
    assert "--refit-zeros" in err[0] and not (tmp_path / "out").exists()  # nothing written
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "out"), "--format", "gptq", "--refit-zeros",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["groups_refitted"] == 1 and res["refitted_layers"] == {"model.layers.0.mlp.up_proj": 1}
    assert res["vllm"].startswith(f"vllm serve {tmp_path / 'out'} --quantization gptq") and res["adapter"] is None
