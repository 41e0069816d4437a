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

.PHONY: install build test test-fast demo bench gpu-report clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py build_ext_config.py
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(TRITON)
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# rebuild saliq._C in place after editing csrc/
build: install
	$(PY) setup.py -q build_ext --inplace

# Triton runs under its interpreter where there is no GPU
test: build
	@if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q

test-fast: build
	@if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q -m "not slow"

demo: build
	$(VENV)/bin/saliq demo

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-enable

gpu-report: build
	$(PY) benchmarks/gpu_report.py

clean:
	rm -rf build *.egg-info saliq/_C*.so
