"""benchmarks/gpu_report.py --smoke on the CPU: every section runs and writes one well-formed JSON record per case
(the fields that keep GPU runs comparable), and the bars are listed."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
pytest.importorskip("triton")
pytest.importorskip("saliq.cpp_backend", reason="saliq._C is not built")
import gpu_report  # noqa: E402


def test_smoke_report_writes_comparable_records(tmp_path):
    assert gpu_report.main(["--smoke", "--out", str(tmp_path)]) == 0
    (jpath,) = tmp_path.glob("*.json")
    data = json.loads(jpath.read_text())
    records = data["records"]
    ops = {r["op"] for r in records}
    assert {"packed_linear", "lora", "decode", "fake_quant_fwd_bwd", "target"} <= ops
    for r in records:
        if r["op"] in ("packed_linear", "fake_quant_fwd_bwd", "decode"):
            for field in ("N", "K", "bits", "group", "M", "dtype", "x_fp16" if r["op"] != "fake_quant_fwd_bwd"
                          else "x_compile"):
                assert field in r, (r["op"], field)
        if r["op"] == "packed_linear":
            assert r["err"] < 1e-5, r  # fp32 on the CPU: the kernels agree with the reference
            assert "pct_bw" in r or r["M"] > 16
    targets = [r for r in records if r["op"] == "target"]
    assert len(targets) == len(gpu_report.BARS)
    assert data["meta"]["copy_bandwidth_gbs"] > 0
