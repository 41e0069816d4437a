"""The sliced-Wasserstein term: zero for equal distributions, blind to the order of tokens, the exact 1-D
distance in one dimension, and differentiable."""
import torch

from saliq.sw_loss import sliced_wasserstein


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_zero_for_the_same_tokens_in_any_order():
    y = torch.randn(2, 16, 8)
    perm = y.reshape(-1, 8)[torch.randperm(32)].reshape(2, 16, 8)
    assert float(sliced_wasserstein(y, perm, 16, _gen())) < 1e-10
    assert float(sliced_wasserstein(y, y + 0.5, 16, _gen())) > 1e-3


def test_one_dimension_is_the_sorted_mean_squared_difference():
    a, b = torch.randn(50, 1), torch.randn(50, 1) * 2 + 1
    want = ((a.flatten().sort().values - b.flatten().sort().values) ** 2).mean()
    assert torch.allclose(sliced_wasserstein(a, b, 3, _gen()), want, rtol=1e-5)


def test_gradients_reach_the_quantized_output():
    y = torch.randn(4, 6, 5, requires_grad=True)
    sliced_wasserstein(y, torch.randn(4, 6, 5), 8, _gen()).backward()
    assert y.grad.abs().sum() > 0
