"""The Triton clipping search against the eager one of saliq/clip_search.py: the same factors per group (a
near-tie may resolve the other way: the group sums run in another order), errors no larger."""
import pytest
import torch
from triton_setup import DEVICE, DTYPES, hermetic_kernels  # noqa: F401  (skips without Triton)

from saliq import ref
from saliq.clip_search import _search_rows
from saliq.kernels.clip_search import search_rows
from saliq.spec import QuantSpec


def _errors(W, S, spec, fmax, fmin):
    """sum over each group of S (What - W)^2 for the chosen factors (fp64 sums)."""
    Wg = ref._grouped(W.float(), spec.group_len(W.shape[1]))
    s, z, *_ = ref.scale_zero(Wg.amax(-1), Wg.amin(-1), fmax, fmin, spec.bits, spec.symmetric)
    q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, (1 << spec.bits) - 1)
    d = ((q - z[..., None]) * s[..., None] - Wg).double() ** 2
    return (d * S.double().reshape(Wg.shape) if S is not None else d).sum(-1)


@pytest.mark.parametrize("bits,group_size,k,n", [(2, 64, 256, 37), (3, 32, 96, 37), (4, 128, 256, 37),
                                                  (2, -1, 100, 37),
                                                  (3, 64, 128, 128)])  # whole tiles only (tiles_are_even)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_s", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_eager_search(bits, group_size, k, n, symmetric, with_s, dtype):
    torch.manual_seed(bits * 10 + k + symmetric + 2 * with_s)
    spec = QuantSpec(bits, group_size, symmetric)
    W = (torch.randn(n, k) * 0.05).to(dtype)
    W[3, 7] = 0.9  # an outlier: its group clips
    W[5] = 0.01  # constant rows: degenerate groups
    S = torch.rand(n, k) ** 4 if with_s else None
    grid = torch.linspace(0.982, 0.4, 12).tolist()
    e_max, e_min = _search_rows(W, S, spec, grid)
    t_max, t_min = search_rows(W.to(DEVICE), None if S is None else S.to(DEVICE), bits, spec.group_len(k),
                               symmetric, grid)
    t_max, t_min = t_max.cpu(), t_min.cpu()
    assert t_max.shape == e_max.shape and t_max.dtype == torch.float32
    same = (t_max == e_max) & (t_min == e_min)
    assert same.float().mean() >= 0.98, f"{int((~same).sum())} of {same.numel()} groups differ"
    err_t, err_e = _errors(W, S, spec, t_max, t_min), _errors(W, S, spec, e_max, e_min)
    assert torch.all(err_t <= err_e * (1 + 1e-5) + 1e-30), "the kernel chose a worse pair"
    assert (t_max <= grid[0]).all() and (t_max >= grid[-1]).all()


def test_the_calibration_search_uses_it_on_tensors_it_serves(monkeypatch):
    # search_clipping takes the kernel for CUDA tensors unless the eager reference is forced
    from saliq import backends, clip_search

    calls = []
    monkeypatch.setattr("saliq.kernels.clip_search.search_rows",
                        lambda *a: calls.append(a) or search_rows(*a))
    W = torch.randn(8, 64, device=DEVICE)
    spec = QuantSpec(2, 32)
    hi, lo = clip_search.search_clipping(W, spec)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with backends.use_backend("ref"):
        hi2, lo2 = clip_search.search_clipping(W, spec)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    assert hi.shape == hi2.shape == (8, 2)
