import math

import pytest
import torch

from saliq import clip_search, ref
from saliq.clip_search import search_clipping
from saliq.spec import QuantSpec


def _group_error(W, hi, lo, spec, S=None):
    """Per-group sum S (What - W)^2 of the reference fake quantization, [N, G]."""
    What, _ = ref.fake_quant_lwc_fwd(W, hi, lo, None, None, spec.bits, spec.group_size, spec.symmetric)
    d = (What.float() - W.float()) ** 2
    if S is not None:
        d = d * S
    g = spec.group_len(W.shape[1])
    return d.reshape(W.shape[0], -1, g).sum(-1)


def _logit(f):
    return torch.logit(torch.as_tensor(f, dtype=torch.float64)).float()


def _grid(steps=clip_search.DEFAULT_STEPS, lowest=clip_search.DEFAULT_LOWEST, init_logit=4.0):
    return torch.linspace(1 / (1 + math.exp(-init_logit)), lowest, steps).tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("weighted", [False, True])
def test_no_group_is_worse_than_any_shared_factor_or_the_last_coordinate_pass(bits, group_size, weighted):
    spec = QuantSpec(bits=bits, group_size=group_size)
    W = torch.randn(37, 192)
    S = torch.rand(37, 192) ** 4 if weighted else None
    hi, lo = search_clipping(W, spec, S)
    found = _group_error(W, hi, lo, spec, S)
    tol = 1e-6 * found.abs().max()
    for f in _grid():  # the shared-factor phase covers every grid value
        c = torch.full_like(hi, float(_logit(f)))
        assert (found <= _group_error(W, c, c, spec, S) + tol).all(), f
    for f in _grid():  # the last pass moved lo alone with hi at its final value
        assert (found <= _group_error(W, hi, torch.full_like(lo, float(_logit(f))), spec, S) + tol).all(), f
    init = torch.full_like(hi, 4.0)
    assert found.sum() < _group_error(W, init, init, spec, S).sum()


def test_the_saliency_moves_the_error_onto_the_unimportant_weights():
    spec = QuantSpec(bits=2, group_size=64)
    W = torch.randn(64, 256)
    S = torch.full_like(W, 1e-3)
    S[:, ::8] = 1.0  # one weight in eight carries nearly all the saliency
    weighted = _group_error(W, *search_clipping(W, spec, S), spec, S).sum()
    plain = _group_error(W, *search_clipping(W, spec, None), spec, S).sum()
    assert weighted < 0.9 * plain


def test_symmetric_search_keeps_one_factor_per_group():
    spec = QuantSpec(bits=3, group_size=32, symmetric=True)
    hi, lo = search_clipping(torch.randn(9, 96), spec)
    assert torch.equal(hi, lo)


def test_factors_stay_on_the_grid_and_the_top_maps_back_to_the_initial_logit():
    spec = QuantSpec(bits=3, group_size=32)
    W = torch.randn(20, 64)
    hi, lo = search_clipping(W, spec, init_logit=3.0, steps=5, lowest=0.5)
    grid = torch.tensor(_grid(steps=5, lowest=0.5, init_logit=3.0))
    for f in (torch.sigmoid(hi), torch.sigmoid(lo)):
        assert (f - grid[:, None, None]).abs().amin(0).max() < 1e-6
    top = hi == 3.0
    assert torch.equal(torch.sigmoid(hi)[top], torch.full_like(hi[top], float(torch.sigmoid(torch.tensor(3.0)))))


def test_rows_are_searched_in_chunks_with_the_same_result(monkeypatch):
    spec = QuantSpec(bits=2, group_size=32)
    W, S = torch.randn(50, 96), torch.rand(50, 96)
    whole = search_clipping(W, spec, S)
    monkeypatch.setattr(clip_search, "_CHUNK_ELEMENTS", 96 * 7)  # 7 rows a pass, a ragged last chunk
    chunked = search_clipping(W, spec, S)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("kw, match", [
    (dict(W=torch.randn(4, 50)), "group_size=32 does not divide in_features=50"),
    (dict(S=torch.rand(4, 32)), r"S has shape \(4, 32\); expected W's shape \(4, 64\)"),
    (dict(steps=0), "steps=0"),
    (dict(lowest=1.5), "lowest=1.5"),
    (dict(W=torch.randn(64)), "W must be 2-D"),
])
def test_bad_arguments_are_named(kw, match):
    args = {"W": torch.randn(4, 64), "spec": QuantSpec(bits=2, group_size=32), **kw}
    with pytest.raises(ValueError, match=match):
        search_clipping(**args)
