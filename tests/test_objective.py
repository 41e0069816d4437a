"""The block-wise training objective (docs/CALIBRATION.md), written out independently and compared with the
loss the trainer actually minimises, step by step, in every stage.

    L_i = lambda_loss * [MSE(F_fp(X_fp), F_q(X_q)) (+ MSE(F_fp(X_q), F_q(X_q)))]
        + lambda_reg * m_i * sum_l sum S'_l (Weff_l - W_l)^2,   S'_l = S_l / (sum S_l * mean W_l^2)

The trainer's `_step_loss` is wrapped: at every step of a real `calibrate` run its loss and its gradients on
the clipping logits and the LoRA factors are recorded, and the same step is recomputed here from a float copy
of the model (the decoder layer called with substituted weights), the ApiQ-style composite of
tests/composite.py and a saliency normalised in this file. Nothing of saliq's block running, fake
quantization, penalty or normalisation is used for the expected values.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from composite import omniquant_fake_quant
from fixtures_llama import make_tiny_llama, random_samples
from saliq import calibrate as calib
from saliq.calibrate import CalibConfig

BITS, GROUP, RANK, ALPHA = 2, 32, 8, 16.0
MULT = [0.5, 2.0]  # m_i differ per block, so a lost multiplier shows
LAMBDA = 0.7
STAGE_WEIGHTS = {"opt": (1.0, 0.0), "wpt": (0.0, 1.0), "mixed": (1.0, 1.0)}  # (lambda_loss, uses lambda_reg)


def raw_saliency(model, seed=5):
    """Positive values spread over six orders of magnitude: a saliency replaced by ones changes the penalty."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                out[f"model.layers.{i}.{name}"] = torch.rand(m.weight.shape, generator=g) ** 6 * 1e-5 + 1e-12
    return out


class _Stop(Exception):
    pass


def layer_call(model, i, ids):
    """The input of decoder layer i when the float model runs on ids [1, L], and the keyword arguments the
    model passes it (mask, position embeddings)."""
    layer = model.model.layers[i]
    seen = {}

    def hook(_m, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"], seen["kwargs"]


def run_layer(layer, x, kwargs, weights=None):
    out = functional_call(layer, weights or {}, (x,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def expected_step(fp, i, ids, x_q, state, sal, stage, after_lora, lam, aug):
    """Loss and gradients of the formula above for block i at one step (parameters as they were)."""
    layer = fp.model.layers[i]
    x_fp, kwargs = layer_call(fp, i, ids)
    leaves = {n: [t.clone().requires_grad_() for t in ts] for n, ts in state.items()}
    weights, pen = {}, 0.0
    for name, (hi, lo, A, B) in leaves.items():
        W = layer.get_submodule(name).weight
        what = omniquant_fake_quant(W, hi, lo, BITS, GROUP, False)
        delta = (ALPHA / RANK) * (B @ A)
        weights[f"{name}.weight"] = what + delta  # x W_eff^T = x What^T + (alpha/r) (x A^T) B^T
        S = sal[f"model.layers.{i}.{name}"]
        S_norm = S / (S.sum() * W.pow(2).mean())
        pen = pen + (S_norm * ((what + delta if after_lora else what) - W) ** 2).sum()
    lam_loss, uses_reg = STAGE_WEIGHTS[stage]
    loss = lam * MULT[i] * uses_reg * pen
    if lam_loss:
        y = run_layer(layer, x_q, kwargs, weights)
        with torch.no_grad():
            y_fp = run_layer(layer, x_fp, kwargs)
            y_aug = run_layer(layer, x_q, kwargs)
        mse = (y - y_fp).pow(2).mean() + ((y - y_aug).pow(2).mean() if aug else 0.0)
        loss = loss + lam_loss * mse
    flat = [t for ts in leaves.values() for t in ts]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)]
    return loss.detach(), grads, float(pen.detach())


def record_steps(monkeypatch):
    """Wrap the trainer's _step_loss: keep, per step, the block, the sample, X_q, the parameters before the
    step, the loss and its gradients."""
    steps = []
    original = calib._BlockTrainer._step_loss

    def spy(self, block, fq, x_q, y_fp, y_aug, scale, idx, lam_loss, lam_reg):
        loss, mse, pen = original(self, block, fq, x_q, y_fp, y_aug, scale, idx, lam_loss, lam_reg)
        params = {n: [m.hi, m.lo, m.lora_A, m.lora_B] for n, m in fq.items()}
        flat = [p for ps in params.values() for p in ps]
        grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
        steps.append(dict(
            block=next(j for j, b in enumerate(self.blocks) if b is block), idx=idx.clone(),
            x_q=x_q[idx].detach().clone(), loss=loss.detach().clone(),
            state={n: [p.detach().clone() for p in ps] for n, ps in params.items()},
            grads=[torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(flat, grads)]))
        return loss, mse, pen

    monkeypatch.setattr(calib._BlockTrainer, "_step_loss", spy)
    return steps


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# (stage, after_lora, lambda_reg, aug_loss): in `opt` the penalty must stay out whatever lambda and after_lora say
CASES = [("opt", False, LAMBDA, True), ("opt", True, LAMBDA, True), ("wpt", False, 0.0, True),
         ("wpt", False, LAMBDA, True), ("wpt", True, LAMBDA, True), ("mixed", False, 0.0, True),
         ("mixed", False, LAMBDA, True), ("mixed", True, LAMBDA, True), ("mixed", True, LAMBDA, False)]


@pytest.mark.parametrize("stage,after_lora,lam,aug", CASES,
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("T" if v else "F"))
def test_each_step_minimises_the_documented_objective(monkeypatch, stage, after_lora, lam, aug):
    samples = random_samples(n=2, seqlen=24)
    fp = make_tiny_llama()
    sal = raw_saliency(fp)
    steps = record_steps(monkeypatch)
    cfg = CalibConfig(method="saliq", bits=BITS, group_size=GROUP, lora_rank=RANK, lora_alpha=ALPHA,
                      schedule=[(stage, 1)], after_lora=after_lora, lambda_reg=lam, block_multipliers=MULT,
                      aug_loss=aug, loss_norm="none", saliency_norm="relative", lr_clip=5e-2, lr_lora=1e-2,
                      clip_init="fixed", seed=7)
    calib.calibrate(make_tiny_llama(), samples, cfg, saliency=sal, progress=False)

    lam_loss, uses_reg = STAGE_WEIGHTS[stage]
    if not lam_loss and not (lam and uses_reg):  # wpt with lambda 0: nothing to train, no step taken
        assert steps == []
        return
    assert [s["block"] for s in steps] == [0, 0, 1, 1]  # 2 samples x 1 epoch per block; LoRA B != 0 at the 2nd
    for n, s in enumerate(steps):
        ids = samples[s["idx"]]
        loss, grads, pen = expected_step(fp, s["block"], ids, s["x_q"], s["state"], sal, stage, after_lora, lam,
                                         aug)
        where = f"step {n} (block {s['block']})"
        assert rel(s["loss"], loss) <= 1e-5, f"{where}: loss {s['loss'].item():.6g}, formula {loss.item():.6g}"
        if lam and uses_reg and lam_loss:  # the penalty is a visible part of the loss, not rounding noise
            assert lam * MULT[s["block"]] * pen > 0.01 * loss.item(), where
        names = [f"{name}.{p}" for name in s["state"] for p in ("hi", "lo", "lora_A", "lora_B")]
        for label, got, want in zip(names, s["grads"], grads):
            assert rel(got, want) <= 1e-4, f"{where}: gradient of {label}: relative error {rel(got, want):.3g}"
    # the gradients checked are real ones: on the logits always, on LoRA whenever LoRA enters the loss
    last = steps[-1]["grads"]
    assert all(g.abs().sum() > 0 for g in last[0::4] + last[1::4])
    if lam_loss or after_lora:
        assert all(g.abs().sum() > 0 for g in last[2::4] + last[3::4])
    # block 1 trains on the quantized model's activations, which differ from the float model's
    x_fp1, _ = layer_call(fp, 1, samples[steps[2]["idx"]])
    assert rel(steps[2]["x_q"], x_fp1) > 1e-4
