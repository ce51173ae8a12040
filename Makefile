# Two commands matter: `make run` (the service) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The service needs only its runtime (and uvloop); the suite's toolchain comes with `make test`.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# The official KHQR SDK (npm), the oracle of the KHQR tests; npm ci rewrites this file.
ORACLE := tests/khqr_oracle
ORACLE_STAMP := $(ORACLE)/node_modules/.package-lock.json

.PHONY: run test test-cluster sandbox migrate lint typecheck clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[fast]'
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev,fast]'
	touch $(DEV_STAMP)

# Without npm the oracle's tests skip (and fail under CI, whose .ci/run installs it).
$(ORACLE_STAMP): $(ORACLE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(ORACLE) --silent --no-audit --no-fund; \
	else echo "npm not found: the KHQR SDK oracle tests will skip"; fi

run: $(RUN_STAMP)
	$(BIN)/khqr-gateway serve

# Each worker has a database of its own, and each test a Redis namespace of its own.
TEST_WORKERS ?= 2
test: $(DEV_STAMP) $(ORACLE_STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The core, crash and two-process tests again on a local Redis Cluster (6 redis-server
# nodes the session starts), plus a failover: see tests/cluster.py.
CLUSTER_TESTS := tests/http/test_transactions.py tests/transactions/test_events.py \
	tests/scenarios/test_crash.py tests/scenarios/test_cluster.py
test-cluster: $(DEV_STAMP) $(ORACLE_STAMP)
	TEST_REDIS_CLUSTER=1 $(BIN)/pytest -n 0 $(PYTEST_ARGS) $(CLUSTER_TESTS)

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
