# The two commands of the README. Each creates .venv from this project's own
# files on a machine that has only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test lint setup gpu-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[torch,dev]"
	touch $@

setup: $(BIN)/.installed

# The main job on its embedded default variant.
demo: setup
	$(BIN)/python experiments/udp.py \
	  --config=experiments/configs/udp.py --workdir=$(WORKDIR)

# The whole test suite (2 processes, forced 4 CPU devices per process).
test: setup
	$(BIN)/python -m pytest -n 2 tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The paper-scale suite on an accelerator (experiments/configs/paper_scale.py):
# stages in order of value, resumed from GPU_WORKDIR, stopped before
# GPU_BUDGET seconds. GPU_PYTHON: a Python with the project's dependencies
# (docs/guide/paper_scale.md sets one up on a machine without a network).
GPU_PYTHON ?= $(BIN)/python
GPU_WORKDIR ?= runs/paper_scale
GPU_BUDGET ?= 780
gpu-check:
	$(GPU_PYTHON) experiments/paper_scale.py --workdir=$(GPU_WORKDIR) \
	  --config.budget_seconds=$(GPU_BUDGET)
