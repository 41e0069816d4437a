#!/usr/bin/env bash
# `make gpu-check`: everything a machine with a GPU should run, in one go, with the machine's own python as it is
# (no virtualenv, no downloads). Builds saliq._C (for this GPU's target only), runs the tensor-core probe
# (benchmarks/probes), writes the GPU report (benchmarks/results/<date>-<device>.md and .json) and the decode
# kernel's code-form A/B ($LOGS/decode_codes.md) while nothing else runs, then runs the GPU tests of the CUDA
# kernels and the Triton tests natively, side by side (they check results, not time). Each step runs even when an
# earlier one failed; the exit status says whether all passed. Logs go to $LOGS (default benchmarks/results/logs).
# About 6-7 minutes on an H100 / H200.
set -u
PY=${PY:-python3}
LOGS=${LOGS:-benchmarks/results/logs}
mkdir -p "$LOGS"
export SALIQ_CACHE=${SALIQ_CACHE:-$(mktemp -d)}  # a fresh tuning cache: what a new user meets
export SALIQ_TUNE_BUDGET_S=${SALIQ_TUNE_BUDGET_S:-inf}  # tune every shape fully: the report compares tuned kernels
export PYTHONUNBUFFERED=1
step() {  # step NAME COMMAND...: run, log, write the exit status to $LOGS/NAME.rc
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$rc" >"$LOGS/$name.rc"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 15 "$LOGS/$name.log"
}
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# only this GPU's target (a Hopper: sm_90a), which halves the build; -v keeps the compile and link lines in the log
hopper="import torch; print('sm_90a' if torch.cuda.get_device_capability() == (9, 0) else '')"
export SALIQ_CUDA_ARCHS=${SALIQ_CUDA_ARCHS-$($PY -c "$hopper")}
rm -f "$LOGS"/*.rc
step build env MAX_JOBS=$(nproc) $PY -m pip install -v --no-build-isolation --no-deps -e .
if command -v nvcc >/dev/null; then  # a few seconds: whether the tensor cores take subnormal codes exactly
  step probe-mma bash -c 'nvcc -O2 -arch=native benchmarks/probes/mma_subnormals.cu -o "$1" && "$1"' _ \
    "$LOGS/mma_subnormals"
fi
step report timeout ${REPORT_TIMEOUT:-360} $PY benchmarks/gpu_report.py --out benchmarks/results ${REPORT_ARGS:-}
# the decode kernel's two code forms at M = 1 (packed fma / subnormals) against ref and side by side: decides the
# default (csrc/cuda/decode_mma.cu, g_codes); timed too, so before the tests
step decode-codes timeout ${CODES_TIMEOUT:-120} $PY benchmarks/decode_codes.py --out "$LOGS/decode_codes.md"
# Test workers: one OpenMP thread and no inductor compile pool each (16 workers on 16 cores;
# the CUDA suite reached 100% on an H200 twice and then did not exit within its timeout).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
step cuda-tests timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -n ${JOBS:-8} --durations=5 \
  tests/test_cuda_gpu.py tests/test_cuda_build.py tests/test_decode_e2e.py tests/test_regimes.py \
  tests/test_rounding_ties.py tests/test_sparse_addmm.py &
if [ "${TRITON_TESTS:-1}" = 1 ]; then
  step triton-tests timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -n ${JOBS:-8} --durations=5 \
    tests/kernels &
fi
wait
cp "$SALIQ_CACHE"/triton-configs/*.json "$LOGS"/ 2>/dev/null || true
failed=$(grep -Lx 0 "$LOGS"/*.rc | xargs -r -n1 basename | sed 's/\.rc$//' | tr '\n' ' ')
if [ -n "$failed" ]; then
  echo "== gpu-check: FAILURES in ${failed}(see $LOGS)"
  exit 1
fi
echo "== gpu-check: all passed"
