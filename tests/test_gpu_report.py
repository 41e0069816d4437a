"""benchmarks/gpu_report.py --smoke on the CPU: every section runs and writes one well-formed JSON record per case
(the fields that keep GPU runs comparable), and the bars are listed."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import triton  # noqa: E402,F401  (a test dependency: missing, collection fails instead of skipping)
import saliq.cpp_backend  # noqa: E402,F401  (saliq._C not built: a collection error, not a skip)
import gpu_report  # noqa: E402


def test_smoke_report_writes_comparable_records(tmp_path):
    assert gpu_report.main(["--smoke", "--out", str(tmp_path)]) == 0
    (jpath,) = tmp_path.glob("*.json")
    data = json.loads(jpath.read_text())
    records = data["records"]
    ops = {r["op"] for r in records}
    assert {"packed_linear", "dequantize", "lora", "decode", "fake_quant_fwd_bwd", "calibration", "target"} <= ops
    for r in records:
        if r["op"] in ("packed_linear", "fake_quant_fwd_bwd", "decode"):
            for field in ("N", "K", "bits", "group", "M", "dtype", "x_fp16" if r["op"] != "fake_quant_fwd_bwd"
                          else "x_compile"):
                assert field in r, (r["op"], field)
        if r["op"] == "dequantize":  # a Triton configuration gave ref's bits (a wrong one is left out)
            assert r["ms_triton"] > 0 and {"N", "K", "bits", "dtype", "ms_cuda", "pct_bw"} <= set(r), r
        if r["op"] == "calibration":
            assert r["s_block"] > 0 and r["x_eager"] > 0 and r["projected_h_70B"] > r["projected_h_7B"] > 0, r
        if r["op"] == "packed_linear":
            assert r["err"] < 1e-5, r  # fp32 on the CPU: the kernels agree with the reference
            assert "pct_bw" in r or r["M"] > 16
            if r["M"] > 16:  # prefill: graph-timed beside the eager timing
                assert r["ms_graph"] > 0 and r["ms_fp16_graph"] > 0 and r["x_fp16_graph"] > 0, r
    targets = [r for r in records if r["op"] == "target"]
    assert len(targets) == len(gpu_report.BARS)
    assert data["meta"]["copy_bandwidth_gbs"] > 0
