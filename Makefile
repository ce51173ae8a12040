# Two commands matter: `make run` (the service) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The service needs only its runtime (and uvloop); the suite's toolchain comes with `make test`.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test sandbox migrate lint typecheck clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[fast]'
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev,fast]'
	touch $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/khqr-gateway serve

test: $(DEV_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

sandbox: $(RUN_STAMP)
	$(BIN)/khqr-gateway sandbox

migrate: $(RUN_STAMP)
	$(BIN)/khqr-gateway migrate

lint: $(DEV_STAMP)
	$(BIN)/ruff check khqr_gateway tests
	$(BIN)/ruff format --check khqr_gateway tests

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .khqr-data
