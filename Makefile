# saliq: `make demo` runs the main job on the demo model, `make test` runs the test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.saliq-installed
# torch first (the CPU wheel here, the same release's CUDA build on a GPU host), then the Triton
# release that torch 2.13's CUDA build pins, then saliq itself without build isolation so that
# saliq._C compiles against the torch just installed.
TORCH  := torch==2.13.0
TRITON := triton==3.7.1

.PHONY: install build test test-fast demo bench gemv-cycles read-patterns reproduce mutation-check gpu-report gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

BUILT  := $(VENV)/.saliq-built
CSRC   := $(shell find csrc -type f)
export MAX_JOBS ?= 2

$(STAMP): $(PY) pyproject.toml setup.py build_ext_config.py
	$(PIP) install -q --upgrade "setuptools>=77" wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(TRITON)
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP) $(BUILT)

install: $(STAMP)

# the editable install builds saliq._C; rebuild it in place only when csrc/ changes
$(BUILT): $(CSRC) | $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	touch $(BUILT)

build: $(BUILT)

# Triton runs under its interpreter where there is no GPU. The benchmark suites run too, with timing off
# (--benchmark-disable in pyproject): their correctness checks keep them from rotting.
test: build
	@if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q tests benchmarks -o python_files="test_*.py bench_*.py"

test-fast: build
	@if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q -m "not slow"

demo: build
	$(VENV)/bin/saliq demo

# CPU timings: passive OpenMP waiting keeps a busy machine from stalling every multi-threaded call
bench: build
	OMP_WAIT_POLICY=passive $(PY) -m pytest benchmarks -q -o python_files='bench_*.py' --benchmark-enable

# Cycles per word row of the CPU int8 GEMV kernels, called from C++ with the weights in L2: their compute rate,
# steady on a machine whose DRAM timings drift (benchmarks/cpu_gemv_cycles.cpp; needs only g++)
GEMV_CYCLES_SRC := benchmarks/cpu_gemv_cycles.cpp csrc/cpu/packed_gemv_portable.cpp csrc/cpu/packed_gemv_avx2.cpp \
	csrc/cpu/packed_gemv_avx512.cpp csrc/cpu/packed_gemv_avx512_bf16.cpp csrc/cpu/packed_gemv_avx2_int8.cpp \
	csrc/cpu/packed_gemv_avx2_vnni.cpp csrc/cpu/packed_gemv_avx2_vnni_evex.cpp csrc/cpu/packed_gemv_avx512_vnni.cpp \
	csrc/cpu/packed_gemv_avx512_vnni_novbmi.cpp csrc/cpu/packed_gemv_avx512_mad.cpp csrc/cpu/packed_gemv_int8_prep.cpp \
	csrc/cpu/cpu_features.cpp
build/cpu_gemv_cycles: $(GEMV_CYCLES_SRC) benchmarks/cpu_clock.h $(CSRC)
	mkdir -p build
	g++ -O3 -std=c++17 -fopenmp-simd -Wno-psabi -Icsrc $(GEMV_CYCLES_SRC) -o $@

gemv-cycles: build/cpu_gemv_cycles
	@for form in avx2 avx2vnni vnni novbmi mad; do for bits in 2 3; do for digits in 3 2; do \
		build/cpu_gemv_cycles $$form 1040 1024 $$bits $$digits; done; done; \
		build/cpu_gemv_cycles $$form 1040 1024 2 2 16 200; done

# How fast a packed weight's bytes come from DRAM in the order the CPU GEMV reads them (format v1's panels) against
# one straight stream and against the panel order (benchmarks/cpu_read_patterns.cpp; needs only g++)
build/cpu_read_patterns: benchmarks/cpu_read_patterns.cpp benchmarks/cpu_clock.h
	mkdir -p build
	g++ -O2 -std=c++17 -mavx2 -fopenmp $< -o $@

read-patterns: build/cpu_read_patterns
	@for threads in 1 $$(nproc); do build/cpu_read_patterns 11008 4096 $$threads; \
		build/cpu_read_patterns 4096 11008 $$threads; done

# The README's quality and CPU-speed tables from scratch (about 30 minutes on a 2-core CPU; REPRODUCE_ARGS=--quick
# for a small budget that only checks the pipeline). Writes benchmarks/results/ (scripts/reproduce.py).
reproduce: build
	OMP_WAIT_POLICY=passive $(PY) scripts/reproduce.py $(REPRODUCE_ARGS)

# Breaks the method and the kernels on purpose in a temporary copy and expects the tests to notice
# (scripts/mutation_check.py, docs/TESTING.md); by hand, before a release.
mutation-check: build
	$(PY) scripts/mutation_check.py $(MUTATION_ARGS)

gpu-report: build
	$(PY) benchmarks/gpu_report.py

# On a machine with a GPU: its own python3 as it is (no venv, no downloads). Builds saliq._C, runs every GPU test
# and the GPU report; writes benchmarks/results/<date>-<device>.md and .json (benchmarks/gpu_check.sh).
gpu-check:
	PY=python3 benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info saliq/_C*.so
