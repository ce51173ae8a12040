# Two commands matter: `make run` (the service) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test sandbox migrate lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/khqr-gateway serve

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

sandbox: $(STAMP)
	$(BIN)/khqr-gateway sandbox

migrate: $(STAMP)
	$(BIN)/khqr-gateway migrate

lint: $(STAMP)
	$(BIN)/ruff check khqr_gateway tests
	$(BIN)/ruff format --check khqr_gateway tests

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .khqr-data
