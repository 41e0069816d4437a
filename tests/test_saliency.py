import pytest
import torch
import torch.nn.functional as F

from fixtures_llama import make_tiny_llama, random_samples
from saliq import hf
from saliq import saliency as S


def _full_backward_fisher(model, samples):
    """Reference: one plain full-model backward per sample, squared weight gradients summed."""
    ref = {}
    for p in model.parameters():
        p.requires_grad_(True)
    for j in range(samples.shape[0]):
        model.zero_grad()
        logits = model(input_ids=samples[j : j + 1]).logits
        F.cross_entropy(logits[0, :-1], samples[j, 1:]).backward()
        for i, block in enumerate(hf.decoder_blocks(model)):
            for n, lin in hf.block_linears(block).items():
                key = f"model.layers.{i}.{n}"
                ref[key] = ref.get(key, 0) + lin.weight.grad.float() ** 2
    model.requires_grad_(False)
    return ref


@pytest.mark.parametrize("batch_size", [1, 2, 8])  # 2: a last, partial batch
def test_blockwise_fisher_equals_a_full_backward(batch_size):
    model, samples = make_tiny_llama(), random_samples(n=3, seqlen=16)
    sal = S.compute_saliency(model, samples, batch_size=batch_size)
    ref = _full_backward_fisher(model, samples)
    assert set(sal) == set(ref) and len(sal) == 14  # 7 linears x 2 blocks
    for k in ref:
        assert sal[k].dtype == torch.float32 and sal[k].device.type == "cpu"
        assert torch.allclose(sal[k], ref[k], rtol=1e-4, atol=1e-12), k
        assert float(sal[k].min()) >= 0 and float(sal[k].sum()) > 0


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        S.compute_saliency(make_tiny_llama(), random_samples(n=1, seqlen=8), batch_size=0)


def test_offloading_blocks_gives_the_same_saliency():
    model, samples = make_tiny_llama(), random_samples(n=2, seqlen=16)
    a = S.compute_saliency(model, samples)
    b = S.compute_saliency(model, samples, offload_blocks=True, device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_round_trip_and_model_check(tmp_path):
    model, samples = make_tiny_llama(), random_samples(n=2, seqlen=16)
    sal = S.compute_saliency(model, samples)
    path = tmp_path / "s.safetensors"
    S.save_saliency(sal, path, {"nsamples": 2})
    back = S.load_saliency(path, model)
    assert all(torch.equal(sal[k], back[k]) for k in sal)
    other = make_tiny_llama(layers=3)
    with pytest.raises(ValueError, match="model.layers.2"):
        S.load_saliency(path, other)
    with pytest.raises(FileNotFoundError, match="saliq saliency"):
        S.load_saliency(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        S.load_saliency(tmp_path / "bad.safetensors")


def test_normalisations():
    S_raw = torch.rand(8, 16) * 1e-9
    W = torch.randn(8, 16) * 0.05
    assert torch.equal(S.normalise(S_raw, W, "raw"), S_raw)
    assert torch.isclose(S.normalise(S_raw, W, "mean").mean(), torch.tensor(1.0))
    rel = S.normalise(S_raw, W, "relative")
    # the penalty of an error of the size of W itself is 1 whatever the scale of S and W
    assert torch.isclose((rel * W.pow(2).mean()).sum(), torch.tensor(1.0), rtol=1e-5)
    assert torch.allclose(S.normalise(S_raw * 1e6, W * 3, "relative") * 9, rel, rtol=1e-5)
    with pytest.raises(ValueError, match="allowed"):
        S.normalise(S_raw, W, "max")
