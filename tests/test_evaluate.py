import math

import torch

from fixtures_llama import make_tiny_llama, random_samples
from saliq.evaluate import perplexity


def test_perplexity_is_exp_of_the_mean_token_loss():
    model = make_tiny_llama()
    windows = random_samples(n=3, seqlen=24)
    res = perplexity(model, windows)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert math.isclose(res["perplexity"], math.exp(float(torch.stack(losses).mean())), rel_tol=1e-5)
    assert res["tokens"] == 72 and res["predicted"] == 69 and res["windows"] == 3 and res["seconds"] > 0


def test_a_model_that_predicts_uniformly_has_perplexity_vocab_size():
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: embeddings become zero too, logits all equal
    res = perplexity(model, random_samples(n=2, seqlen=16))
    assert math.isclose(res["perplexity"], model.config.vocab_size, rel_tol=1e-4)
