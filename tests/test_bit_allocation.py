"""Saliency-driven bit allocation: the budget holds, upgrades go where they remove the most weighted error, and
a model with mixed widths saves and loads."""
import pytest
import torch

from fixtures_llama import make_tiny_llama, random_samples
from saliq import bit_allocation, hf
from saliq.nn import QuantLinear
from saliq.spec import QuantSpec


def _weights(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(32, 64, generator=g) for i in range(n)}


def test_upgrades_go_to_the_most_salient_linears_within_the_budget():
    W = _weights()
    S = {k: torch.full_like(v, 1.0) for k, v in W.items()}
    S["l2"] *= 100.0  # the most salient linear
    bits = bit_allocation.allocate(W, S, QuantSpec(2, 64), budget=2.25)
    assert bits == {"l0": 2, "l1": 2, "l2": 3, "l3": 2}
    assert bit_allocation.average_bits(bits, W) <= 2.25
    everything = bit_allocation.allocate(W, S, QuantSpec(2, 64), budget=3.0)
    assert set(everything.values()) == {3}


def test_gain_per_bit_counts_the_size_of_the_linear():
    g = torch.Generator().manual_seed(1)
    W = {"small": torch.randn(16, 64, generator=g), "large": torch.randn(64, 64, generator=g)}
    # the same total weighted error: per extra bit the small linear removes four times as much
    S = {"small": torch.full((16, 64), 4.0), "large": torch.ones(64, 64)}
    W["small"] = W["large"][:16].clone()
    S["large"][16:] = 0.0
    bits = bit_allocation.allocate(W, S, QuantSpec(2, 64), budget=2.2)
    assert bits == {"small": 3, "large": 2}


@pytest.mark.parametrize("budget,widths,match", [(3.5, None, r"bit_budget=3.5 must lie in \[2, 3\]"),
                                                 (2.5, (3, 2), "widths=")])
def test_bad_budgets_name_what_is_allowed(budget, widths, match):
    with pytest.raises(ValueError, match=match):
        bit_allocation.allocate(_weights(), None, QuantSpec(2, 64), budget, widths)


def test_a_model_with_mixed_widths_round_trips(tmp_path):
    from saliq.cli import describe_checkpoint

    model = make_tiny_llama()
    for i, block in enumerate(hf.decoder_blocks(model)):
        for name, lin in hf.block_linears(block).items():
            bits = 3 if name.endswith(("v_proj", "down_proj")) else 2
            hf.set_submodule(block, name, QuantLinear.from_linear(lin, QuantSpec(bits, 32),
                                                                  scale_dtype=torch.float16))
    x = random_samples(n=1, seqlen=10)
    hf.save(model, tmp_path)
    loaded, _ = hf.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert loaded.model.layers[0].mlp.down_proj.spec.bits == 3 and loaded.model.layers[0].mlp.up_proj.spec.bits == 2
    info = describe_checkpoint(tmp_path)
    assert info["layers_by_bits"] == {2: 10, 3: 4}
    assert info["quantization_config"]["bits"] == 2
