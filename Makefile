# The two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint system-deps stack format clean

demo: $(INSTALLED)
	$(BIN)/python -m fleet.demo

test: lint
	$(BIN)/pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

stack: $(INSTALLED)
	$(BIN)/python -m fleet.demo --stack-only

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

system-deps:
	@scripts/ensure-system-deps.sh

$(INSTALLED): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
