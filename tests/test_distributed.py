"""Data-parallel calibration: `torchrun --nproc-per-node 2 saliq quantize` on the CPU (gloo) gives the checkpoint
one process gives at the same --batch-size, within fp32 rounding of the gradient all-reduce."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fixtures_llama import write_model_and_text
from saliq.cli import main

SETTINGS = ["--method", "saliq", "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--lora-rank", "8",
            "--epochs", "1", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_model_and_text(tmp_path_factory.mktemp("ddp"))


def _tensors(ckpt):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _torchrun(files, out, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "saliq.cli", "quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--out", str(out),
           "--device", "cpu", *SETTINGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_give_the_one_process_checkpoint(files, tmp_path):
    single = tmp_path / "single"
    assert main(["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--out", str(single),
                 "--device", "cpu", *SETTINGS]) == 0
    run = _torchrun(files, tmp_path / "ddp", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    # only process 0 prints (and writes)
    assert sum(line.startswith("saved ") for line in lines) == 1, run.stderr
    assert sum(line.startswith("calibration: ") for line in lines) == 1, run.stderr
    a, b = _tensors(single), _tensors(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].numel() == 0:
            assert b[k].numel() == 0, k
        elif a[k].dtype in (torch.int32, torch.int16):  # codes and zero points: a rounding tie may flip one
            assert (a[k] != b[k]).float().mean() <= 0.01, k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
    assert not list(tmp_path.glob("ddp.tmp-*")) and not (tmp_path / "ddp" / ".calib").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(files, tmp_path):
    run = _torchrun(files, tmp_path / "odd", 2, "--batch-size", "3")
    assert run.returncode != 0
    assert "--batch-size 3 does not split over 2 processes; use a multiple of 2" in run.stderr
