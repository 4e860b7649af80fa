# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs, once (stamp files).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned so pip resolves it in one step: on a machine that carries the
# CPU wheel locally pip takes that file; elsewhere PyPI serves the default
# build (CUDA on Linux x86_64). Override for another build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.13.0

.PHONY: demo test test-all lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(BIN)/ember train recipes/gpt-tiny.yaml --run-dir runs/demo
	@echo "--- text sampled from runs/demo (ember generate runs/demo --prompt 'class Parser:') ---"
	$(BIN)/ember generate runs/demo --prompt "class Parser:" --max-new-tokens 200

test: lint
	$(BIN)/python -m pytest -q

# ruff keeps the code uniform: make test fails on a lint finding or an unformatted file;
# make format fixes what it can.
LINTED := src tests benchmarks

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# The slow-marked tests too (longer recipe runs).
test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
