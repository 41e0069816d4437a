"""The triton backend's registration, its measured dispatch and the per-GPU launch-configuration cache."""
import importlib
import json
import os
import sys

import pytest
import torch

import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU", allow_module_level=True)

from saliq import backends  # noqa: E402
from saliq.kernels import autotune  # noqa: E402

OPS = ("fake_quant_lwc_fwd", "fake_quant_lwc_bwd", "saliency_sq_error", "packed_matmul", "dequantize")


def test_registered_for_every_kernel_op():
    assert "saliq.triton_backend" not in backends.load_optional_backends()
    for op in OPS:
        assert "triton" in backends.available(op, DEVICE), op
    if DEVICE == "cuda":
        for op in OPS:
            if op == "packed_matmul":  # the table of saliq/regimes.py: Triton from 17 rows of fp16 on
                x = torch.empty(17, 64, device="cuda", dtype=torch.float16)
            else:
                x = torch.empty(1, device="cuda")
            assert backends.resolve(op, "cuda", x) is backends._impls["triton"][op], op


def test_import_error_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "saliq.triton_backend", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("saliq.triton_backend")


def test_chooser_defaults_to_triton():
    import saliq.triton_backend as tb

    choose = tb._make_chooser("packed_matmul")
    assert choose(torch.empty(3, 64), 2, 64, 64) in ("triton", "ref")


def test_config_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    cfg = {"BLOCK_M": 16, "kind": "gemm", "num_warps": 4}
    autotune.record("packed_matmul", (2, 64, 4096, 11008, "float16", 16), cfg, "cpu")
    files = list((tmp_path / "triton-configs").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["triton"] and list(data["entries"].values()) == [cfg]
    monkeypatch.setattr(autotune, "_memory", {})  # a fresh process reads it back from disk
    assert autotune.lookup("packed_matmul", (2, 64, 4096, 11008, "float16", 16), "cpu") == cfg
    assert autotune.lookup("packed_matmul", (2, 64, 4096, 11008, "float16", 32), "cpu") is None


def test_choose_without_gpu_takes_the_default(monkeypatch):
    calls = []
    cands = [{"a": 1}, {"a": 2}]
    if DEVICE == "cpu":
        assert autotune.choose("x", (1,), cands, calls.append, "cpu") == cands[0]
        assert calls == []  # nothing is timed under the interpreter
    monkeypatch.setenv("SALIQ_AUTOTUNE", "0")
    assert autotune.choose("x", (1,), cands, calls.append, DEVICE) == cands[0]


def _fake_gpu(monkeypatch, tmp_path, budget, ms_per_run):
    """choose() on a pretend GPU: every measurement costs `ms_per_run` of a fake clock."""
    clock = [0.0]
    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path))
    monkeypatch.setenv("SALIQ_AUTOTUNE", "1")
    monkeypatch.setenv("SALIQ_TUNE_BUDGET_S", str(budget))
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_spent", [0.0])
    monkeypatch.setattr(autotune, "is_interpreter", lambda: False)
    monkeypatch.setattr(autotune, "device_name", lambda device: "Pretend GPU")
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])

    def timed(fn, **_):
        clock[0] += ms_per_run / 1e3
        return fn()

    monkeypatch.setattr(autotune, "cuda_time_ms", timed)


def test_tuning_stops_at_its_budget_and_records_only_complete_searches(monkeypatch, tmp_path):
    cands = [{"ms": 3.0}, {"ms": 1.0}, {"ms": 2.0}, {"ms": 0.5}]
    _fake_gpu(monkeypatch, tmp_path, budget=2.5, ms_per_run=1000.0)  # each candidate costs 1 s of tuning
    # the first search measures candidates until the budget is spent: 3 of 4, so its winner is not recorded
    assert autotune.choose("op", (1,), cands, lambda c: c["ms"], "cuda") == cands[1]
    assert autotune.lookup("op", (1,), "cuda") is None
    # the budget is spent: the next miss takes the default at once, measuring nothing
    assert autotune.choose("op", (2,), cands, lambda c: pytest.fail("tuned past the budget"), "cuda") == cands[0]
    # a complete search (ample budget) is recorded and answers later lookups
    _fake_gpu(monkeypatch, tmp_path, budget=100, ms_per_run=1000.0)
    assert autotune.choose("op", (3,), cands, lambda c: c["ms"], "cuda") == cands[3]
    assert autotune.lookup("op", (3,), "cuda") == cands[3]


@pytest.mark.parametrize("bad", ["-1", "soon", "nan"])
def test_a_bad_tuning_budget_is_refused_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv("SALIQ_TUNE_BUDGET_S", bad)
    with pytest.raises(ValueError, match=f"SALIQ_TUNE_BUDGET_S='{bad}' must be a number of seconds >= 0"):
        autotune.tune_budget_s()


def test_m_bucket():
    assert [autotune.m_bucket(m) for m in (0, 1, 3, 16, 17, 100, 4096, 100000)] == \
        [1, 1, 3, 16, 32, 128, 4096, 8192]


def test_poisoned_outputs(monkeypatch):
    from saliq.kernels import common

    monkeypatch.setenv("SALIQ_POISON_OUTPUTS", "1")
    assert torch.isnan(common.alloc((3, 5), torch.float16, DEVICE)).all()
    monkeypatch.setenv("SALIQ_POISON_OUTPUTS", "0")
    assert common.alloc((3, 5), torch.float32, DEVICE).shape == (3, 5)


@pytest.mark.gpu
def test_gpu_autotune_writes_the_cache(tmp_path, monkeypatch):
    from saliq.kernels import packed_matmul as pm
    from saliq import packing
    from saliq.spec import QuantSpec

    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path))
    monkeypatch.setenv("SALIQ_AUTOTUNE", "1")
    monkeypatch.setenv("SALIQ_TUNE_BUDGET_S", "inf")  # every candidate, so the winner is recorded
    monkeypatch.setattr(autotune, "_memory", {})
    q = torch.randint(0, 4, (256, 512), device="cuda")
    p = packing.pack_weight(q, torch.rand(256, 8, device="cuda"), torch.ones(256, 8, device="cuda"),
                            QuantSpec(bits=2, group_size=64), dtype=torch.float16)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    pm.packed_matmul(x, p.qweight, p.qweight_hi, p.scales, p.zeros, 2, 64, 512, None)
    data = json.loads(next((tmp_path / "triton-configs").glob("*.json")).read_text())
    assert any(k.startswith("packed_matmul|") for k in data["entries"])


def test_configs_measured_on_a_gpu_model_ship_with_the_package(monkeypatch, tmp_path):
    """kernels/configs/<gpu>.json answers lookups on that GPU model before any tuning (no first-call stall), with
    configurations the launcher offers; the user's own cache wins over it."""
    from saliq.kernels import packed_matmul as pm

    monkeypatch.setenv("SALIQ_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(autotune, "_memory", {})
    key = (2, 64, 4096, 11008, "float16", 256, False)
    shipped = autotune.lookup("packed_matmul", key, "cpu")
    assert shipped is not None
    monkeypatch.setattr(pm, "is_interpreter", lambda: False)
    assert shipped in pm.candidates(256, 64, 11008)
    mine = dict(shipped, num_warps=8)
    autotune.record("packed_matmul", key, mine, "cpu")
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.lookup("packed_matmul", key, "cpu") == mine


def test_shipped_dequantize_configs_are_candidates(monkeypatch):
    """Every dequantize entry of the shipped tables is the CUDA kernel or a Triton configuration dequantize_into
    offers (a stale entry would be ignored, and its bucket tuned again on first use)."""
    import glob
    import os

    from saliq.kernels import dequantize as dq

    monkeypatch.setattr(dq, "is_interpreter", lambda: False)
    tables = glob.glob(os.path.join(os.path.dirname(autotune.__file__), "configs", "*.json"))
    entries = [(name, cfg) for t in tables for name, cfg in json.loads(open(t).read())["entries"].items()
               if name.startswith("dequantize|")]
    assert entries, "no shipped dequantize entries"
    for name, cfg in entries:
        assert cfg == {"kind": "cuda"} or cfg in dq._candidates(), (name, cfg)
