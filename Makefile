# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,postgres]'

run: install
	$(BIN)/webaims-tui

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install-test lint
	$(BIN)/pytest -n 2 --dist loadgroup
	# The engine suite once more, on a throwaway PostgreSQL server (tests/postgres.py).
	WEBAIMS_TEST_DATABASE=postgresql $(BIN)/pytest tests/engine -n 2 --dist loadgroup
