# The two commands the README names. Both make their own virtual environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

.PHONY: venv demo test lint format

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

demo: venv
	$(BIN)/jfe demo --workdir $(WORKDIR)

test: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q tests
	$(BIN)/ruff check jfe_jax tests benchmarks configs launch

lint: venv
	$(BIN)/ruff check jfe_jax tests benchmarks configs launch
	$(BIN)/ruff format --check jfe_jax tests benchmarks configs launch

format: venv
	$(BIN)/ruff format jfe_jax tests benchmarks configs launch
	$(BIN)/ruff check --fix jfe_jax tests benchmarks configs launch
