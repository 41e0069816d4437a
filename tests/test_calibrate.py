import json

import pytest
import torch

from fixtures_llama import make_tiny_llama, random_samples
from saliq import hf, ref
from saliq import saliency as S
from saliq.calibrate import CalibConfig, NonFiniteLossError, ResumeMismatchError, calibrate
from saliq.clip_search import search_clipping
from saliq.nn import QuantLinear

TINY = dict(group_size=32, lora_rank=8, seed=3)


def _cfg(**kw):
    return CalibConfig(**{**TINY, **kw})


def _logits(model, samples):
    with torch.no_grad():
        return model(input_ids=samples).logits


def test_rtn_replaces_every_block_linear():
    model = make_tiny_llama()
    calibrate(model, random_samples(), _cfg(method="rtn"), progress=False)
    for block in hf.decoder_blocks(model):
        kinds = {type(m) for m in block.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))}
        assert kinds == {QuantLinear}


def test_trainer_lowers_the_block_loss_and_logs_every_epoch(tmp_path):
    model, samples = make_tiny_llama(), random_samples(n=8)
    res = calibrate(model, samples, _cfg(method="apiq", epochs=4), work_dir=tmp_path / "w", progress=False)
    lines = [json.loads(l) for l in (tmp_path / "w" / "calibration_log.jsonl").read_text().splitlines()]
    assert lines == res.log and len(lines) == 2 * 4
    for b in (0, 1):
        losses = [e["loss"] for e in lines if e["block"] == b]
        assert losses[-1] < 0.9 * losses[0], losses
    assert len(res.block_seconds) == 2 and res.peak_memory_bytes > 0
    assert "per block" in res.summary() and "peak memory" in res.summary()


def test_apiq_beats_rtn_on_the_output():
    samples = random_samples(n=8)
    ref = _logits(make_tiny_llama(), samples)
    errs = {}
    for method in ("rtn", "apiq"):
        model = make_tiny_llama()
        calibrate(model, samples, _cfg(method=method, epochs=4), progress=False)
        errs[method] = float((_logits(model, samples) - ref).norm() / ref.norm())
    assert errs["apiq"] < errs["rtn"], errs


def _saliency_weighted_error(model, sal, norm="relative"):
    total = 0.0
    fp = make_tiny_llama()
    for i, (bq, bf) in enumerate(zip(hf.decoder_blocks(model), hf.decoder_blocks(fp))):
        fp_lins = hf.block_linears(bf)
        for name, m in bq.named_modules():
            if isinstance(m, QuantLinear):
                W = fp_lins[name].weight
                Sn = S.normalise(sal[f"model.layers.{i}.{name}"], W, norm)
                total += float((Sn * (m.dequantized_weight().float() - W) ** 2).sum())
    return total


def test_saliq_lowers_the_saliency_weighted_error_against_apiq_at_equal_epochs():
    samples = random_samples(n=8)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    errs = {}
    for method, kw in (("apiq", {}), ("saliq", dict(schedule=[("mixed", 3)], lambda_reg=1.0, loss_norm="none"))):
        model = make_tiny_llama()
        calibrate(model, samples, _cfg(method=method, epochs=3, **kw), saliency=sal, progress=False)
        errs[method] = _saliency_weighted_error(model, sal)
    assert errs["saliq"] < errs["apiq"], errs


@pytest.mark.parametrize("method", ["apiq", "saliq"])
def test_the_clipping_search_sets_the_starting_logits(method):
    samples = random_samples(n=2)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    model, fp = make_tiny_llama(), make_tiny_llama()
    # no training: the start is packed (with the fp32 scales the search gives)
    cfg = _cfg(method=method, schedule=[("opt", 0)], clip_init="search", scale_dtype="float32")
    calibrate(model, samples, cfg, saliency=sal, progress=False)
    for i, (bq, bf) in enumerate(zip(hf.decoder_blocks(model), hf.decoder_blocks(fp))):
        for name, lin in hf.block_linears(bf).items():
            Sn = S.normalise(sal[f"model.layers.{i}.{name}"], lin.weight, "relative") if method == "saliq" else None
            hi, lo = search_clipping(lin.weight, cfg.spec, Sn, cfg.init_logit)
            want, _ = ref.fake_quant_lwc_fwd(lin.weight, hi, lo, None, None, cfg.bits, cfg.group_size, False)
            got = bq.get_submodule(name).dequantized_weight()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_saliq_defaults_search_then_wpt_after_lora_then_opt_and_apiq_keeps_the_published_ones():
    sal = CalibConfig(method="saliq", epochs=3)
    assert (sal.clip_init, sal.after_lora, sal.schedule) == ("search", True, [("wpt", 3), ("opt", 3)])
    apiq = CalibConfig(method="apiq", epochs=3)
    assert (apiq.clip_init, apiq.after_lora, apiq.schedule) == ("fixed", False, [("opt", 3)])
    chosen = CalibConfig(method="saliq", clip_init="fixed", after_lora=False)
    assert (chosen.clip_init, chosen.after_lora) == ("fixed", False)


@pytest.mark.parametrize("kw", [dict(method="apiq", epochs=2),
                                dict(method="saliq", schedule=[("wpt", 1), ("mixed", 1)], after_lora=True),
                                dict(method="saliq", epochs=1, reserve_fraction=0.02, bit_budget=2.5, sw_weight=0.5),
                                dict(method="saliq", epochs=1, lora_in_grid=True, reserve_fraction=0.01)])
def test_a_resumed_run_ends_with_the_same_model_as_an_uninterrupted_one(tmp_path, kw):
    samples = random_samples(n=4)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    whole = make_tiny_llama()
    calibrate(whole, samples, _cfg(**kw), saliency=sal, progress=False)

    interrupted = make_tiny_llama()
    calibrate(interrupted, samples, _cfg(**kw), work_dir=tmp_path, saliency=sal, progress=False, stop_after_block=0)
    assert json.loads((tmp_path / "progress.json").read_text())["next_block"] == 1
    torch.manual_seed(12345)  # the restarted process's RNG differs; the result must not
    resumed = make_tiny_llama()
    res = calibrate(resumed, samples, _cfg(**kw), work_dir=tmp_path, saliency=sal, progress=False)
    assert res.resumed_from == 1 and len(res.block_seconds) == 2
    assert len(res.log) == len({(e["block"], e["epoch"]) for e in res.log}) == 2 * 2
    sd_w, sd_r = whole.state_dict(), resumed.state_dict()
    assert sd_w.keys() == sd_r.keys()
    for k in sd_w:
        assert torch.equal(sd_w[k], sd_r[k]), k
    assert torch.equal(_logits(whole, samples), _logits(resumed, samples))


def test_resuming_with_other_settings_is_refused(tmp_path):
    samples = random_samples(n=4)
    calibrate(make_tiny_llama(), samples, _cfg(method="apiq", epochs=1), work_dir=tmp_path, progress=False,
              stop_after_block=0)
    with pytest.raises(ResumeMismatchError, match="other settings"):
        calibrate(make_tiny_llama(), samples, _cfg(method="apiq", epochs=2), work_dir=tmp_path, progress=False)


def test_a_non_finite_loss_in_the_first_block_says_no_block_was_finished(tmp_path, monkeypatch):
    from saliq import calibrate as C

    step = C._BlockTrainer._step_loss
    monkeypatch.setattr(C._BlockTrainer, "_step_loss", lambda *a: (lambda r: (r[0] * float("nan"), *r[1:]))(step(*a)))
    model = make_tiny_llama()
    with pytest.raises(NonFiniteLossError, match=r"block 0, stage opt, epoch 0; no block was finished\.") as exc:
        calibrate(model, random_samples(n=4), _cfg(method="apiq", epochs=1), work_dir=tmp_path, progress=False)
    assert "0..-1" not in str(exc.value)


def test_a_non_finite_loss_names_block_and_epoch_and_keeps_finished_blocks(tmp_path):
    model = make_tiny_llama()
    # block 1's MLP output turns NaN (a NaN weight would be refused before any work)
    hf.decoder_blocks(model)[1].mlp.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"block 1, stage opt, epoch 0.*block 0 is checkpointed"):
        calibrate(model, random_samples(n=4), _cfg(method="apiq", epochs=1), work_dir=tmp_path, progress=False)
    assert (tmp_path / "block_0000.safetensors").is_file()
    assert json.loads((tmp_path / "progress.json").read_text())["next_block"] == 1


@pytest.mark.parametrize("kw, match", [
    (dict(method="gptq"), "method='gptq'"),
    (dict(method="apiq", schedule=[("wpt", 1)]), "stage 'opt' only"),
    (dict(schedule=[("warmup", 1)]), "stage 'warmup'"),
    (dict(bits=5), "bits=5"),
    (dict(loss_norm="l1"), "loss_norm='l1'"),
    (dict(saliency_norm="max"), "saliency_norm='max'"),
    (dict(clip_init="grid"), "clip_init='grid'"),
    (dict(after_lora="yes"), "after_lora='yes'"),
    (dict(lr_clip=-1e-3), r"lr_clip=-0.001 must be >= 0 and finite"),
    (dict(lr_lora=float("nan")), r"lr_lora=nan must be >= 0 and finite"),
    (dict(weight_decay=-0.1), r"weight_decay=-0.1 must be"),
    (dict(lambda_reg=float("inf")), r"lambda_reg=inf must be >= 0 and finite"),
    (dict(lora_alpha=-16.0), r"lora_alpha=-16.0 must be > 0 and finite"),
    (dict(init_logit=float("nan")), r"init_logit=nan must be a finite number"),
    (dict(epochs=-1), r"epochs=-1 must be >= 0"),
    (dict(block_multipliers=[1, float("nan")]), r"block_multipliers=\[1.0, nan\] must all be >= 0 and finite"),
    (dict(reserve_fraction=0.6), r"reserve_fraction=0.6 must lie in \[0, 0.5\)"),
    (dict(reserve_score="size"), "reserve_score='size'"),
    (dict(lora_in_grid=True, lora_rank=0), "lora_in_grid=True needs lora_rank > 0"),
    (dict(bits=2, bit_budget=3.5), r"bit_budget=3.5 must be 0 \(off\) or lie in \[2, 3\]"),
    (dict(sw_weight=-1.0), "sw_weight=-1.0 must be >= 0"),
    (dict(sw_projections=0), "sw_projections=0 must be >= 1"),
    (dict(scale_dtype="bfloat16"), "scale_dtype='bfloat16' is not supported"),
])
def test_bad_settings_are_rejected_with_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        CalibConfig(**kw)


def test_a_wpt_stage_with_no_penalty_is_skipped_not_a_crash():
    samples = random_samples(n=2)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    models = []
    for kw in (dict(lambda_reg=0.0), dict(block_multipliers=[0.0, 0.0]), dict(schedule=[("opt", 1)])):
        model = make_tiny_llama()
        res = calibrate(model, samples, _cfg(method="saliq", epochs=1, **kw), saliency=sal, progress=False)
        assert [e["stage"] for e in res.log] == ["opt", "opt"]
        models.append(model)
    for model in models[:2]:  # the same model as the schedule without the wpt stage
        assert torch.equal(_logits(model, samples), _logits(models[2], samples))


def test_negative_lambda_or_multipliers_are_rejected():
    with pytest.raises(ValueError, match="lambda_reg=-0.1 must be >= 0"):
        CalibConfig(lambda_reg=-0.1)
    with pytest.raises(ValueError, match=r"block_multipliers=\[1.0, -1.0\] must all be >= 0"):
        calibrate(make_tiny_llama(), random_samples(n=2), _cfg(method="apiq", epochs=1, block_multipliers=[1, -1]),
                  progress=False)


def test_block_multipliers_must_cover_every_block():
    with pytest.raises(ValueError, match="block_multipliers has 3 values"):
        calibrate(make_tiny_llama(), random_samples(n=2), _cfg(method="apiq", epochs=1, block_multipliers=[1, 1, 1]),
                  progress=False)


def _rewrite_metadata(path, fingerprint):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"fingerprint": fingerprint})


@pytest.mark.parametrize("victim", ["acts_0001.safetensors", "block_0000.safetensors"])
def test_work_dir_files_of_another_run_are_refused_not_reused(tmp_path, victim):
    samples = random_samples(n=2)
    cfg = _cfg(method="apiq", epochs=1)
    calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, progress=False, stop_after_block=0)
    _rewrite_metadata(tmp_path / victim, "0" * 64)  # as if left there by a run with other settings
    with pytest.raises(ResumeMismatchError, match=f"{victim} was written by a run with other settings or data"):
        calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, progress=False)
    (tmp_path / victim).unlink()
    with pytest.raises(ResumeMismatchError, match=f"{victim} is missing"):
        calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, progress=False)


@pytest.mark.parametrize("change, what", [
    (dict(samples=random_samples(n=2, seed=1)), "the calibration samples"),
    (dict(model=make_tiny_llama(seed=1)), "the model"),
    (dict(cfg=_cfg(method="apiq", epochs=1, lr_clip=1e-2)), "settings: lr_clip 0.005 -> 0.01"),
])
def test_a_work_dir_names_what_differs_when_it_cannot_be_resumed(tmp_path, change, what):
    samples, cfg = random_samples(n=2), _cfg(method="apiq", epochs=1)
    calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, progress=False, stop_after_block=0)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["components"]["settings"]["lr_clip"] == 0.005 and len(manifest["fingerprint"]) == 64
    with pytest.raises(ResumeMismatchError, match=f"other settings or data \\(differs in: {what}"):
        calibrate(change.get("model", make_tiny_llama()), change.get("samples", samples), change.get("cfg", cfg),
                  work_dir=tmp_path, progress=False)


def test_a_saliency_passed_in_is_part_of_the_fingerprint(tmp_path):
    samples = random_samples(n=2)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    cfg = _cfg(method="saliq", schedule=[("wpt", 1)])
    calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, saliency=sal, progress=False, stop_after_block=0)
    other = {k: v * 2 for k, v in sal.items()}
    with pytest.raises(ResumeMismatchError, match="the saliency"):
        calibrate(make_tiny_llama(), samples, cfg, work_dir=tmp_path, saliency=other, progress=False)


def test_without_a_work_dir_nothing_is_hashed(monkeypatch, tmp_path):
    # the fingerprint guards a work dir's files; hashing copies the model and the saliency to the host, which
    # on a GPU cost as much as the block itself
    import saliq.calibrate as cal

    samples = random_samples(n=2)
    sal = S.compute_saliency(make_tiny_llama(), samples)
    cfg = _cfg(method="saliq", schedule=[("wpt", 1)])
    hashed = []
    for name in ("model_fingerprint", "samples_fingerprint", "tensors_digest"):
        real = getattr(cal, name)
        monkeypatch.setattr(cal, name, lambda *a, _real=real, _name=name: hashed.append(_name) or _real(*a))
    calibrate(make_tiny_llama(), samples, cfg, saliency=sal, progress=False)
    assert hashed == []
    calibrate(make_tiny_llama(), samples, cfg, saliency=sal, progress=False, work_dir=tmp_path, stop_after_block=0)
    assert {"model_fingerprint", "samples_fingerprint", "tensors_digest"} <= set(hashed)  # a work dir is guarded
