# The two commands the README names. Both make their own virtual environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo
LINT_PATHS := jfe_jax tests $(wildcard benchmarks/*.py benchmarks/device/*.py configs/*.py launch/*.py)

.PHONY: venv venv-demo demo test lint format

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Tests, lint and the TPU tools (libtpu for `jfe aot`).
venv: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,tpu]"

# Only what the demo needs: the package and its dependencies.
venv-demo: $(BIN)/python
	$(BIN)/pip install -q -e .

demo: venv-demo
	$(BIN)/jfe demo --workdir $(WORKDIR)

test: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests
	$(BIN)/ruff check $(LINT_PATHS)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)
