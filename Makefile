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

.PHONY: demo test test-all test-floor test-floor-subset lint format install clean

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
LINTED := src tests benchmarks tools

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# The slow-marked tests too (longer recipe runs).
test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The declared floors, installed: every dependency of ember[test] pinned at the lowest version
# pyproject.toml allows (tools/floors.py writes the constraints; wheels only: a floor without a
# wheel for this Python is no floor), then the fast suite, or FLOOR_TESTS alone, e.g.
#   make test-floor-subset    (FLOOR_SUBSET: the tests of what the floors pin, a few minutes)
# Not part of make test: the floor install alone takes minutes and a few hundred MB of
# downloads, which CI's budget has no room for; make test's tests/test_packaging.py checks
# the floors table itself. Run it after changing a dependency or an API a floor protects.
# torch stays $(TORCH): check its floor where that build can be had, e.g.
#   make test-floor TORCH="torch==2.6.0 --index-url https://download.pytorch.org/whl/cpu"
FLOOR_VENV   := .venv-floor
FLOOR_TESTS  ?=
FLOOR_SUBSET := tests/test_packaging.py tests/test_config.py tests/test_dedup.py tests/test_augment.py \
	tests/test_evaluate.py tests/test_tune.py tests/test_compress.py tests/test_prune.py tests/test_report.py \
	tests/test_hf_interop.py tests/test_hf_source.py tests/test_onnx_export.py tests/test_any_tokenizer.py \
	tests/test_prepare_tables.py tests/test_train.py tests/test_cv.py

test-floor:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(PYTHON) tools/floors.py pyproject.toml --extras test > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --only-binary=:all: -c $(FLOOR_VENV)/constraints.txt -e '.[test]'
	$(FLOOR_VENV)/bin/python -m pip freeze > $(FLOOR_VENV)/installed.txt
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

test-floor-subset:
	$(MAKE) test-floor FLOOR_TESTS="$(FLOOR_SUBSET)"

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs .pytest_cache build src/*.egg-info
