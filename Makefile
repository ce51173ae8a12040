# Two commands matter: `make run` (the service) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The official KHQR SDK (npm), the oracle of the KHQR tests; npm ci rewrites this file.
ORACLE := tests/khqr_oracle
ORACLE_STAMP := $(ORACLE)/node_modules/.package-lock.json

.PHONY: run test test-cluster sandbox migrate lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

# Without npm the oracle's tests skip (and fail under CI, whose .ci/run installs it).
$(ORACLE_STAMP): $(ORACLE)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(ORACLE) --silent --no-audit --no-fund; \
	else echo "npm not found: the KHQR SDK oracle tests will skip"; fi

run: $(STAMP)
	$(BIN)/khqr-gateway serve

test: $(STAMP) $(ORACLE_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The core, crash and two-process tests again on a local Redis Cluster (6 redis-server
# nodes the session starts), plus a failover: see tests/cluster.py.
CLUSTER_TESTS := tests/test_api_transactions.py tests/test_crash.py tests/test_events.py \
	tests/test_cluster.py
test-cluster: $(STAMP)
	TEST_REDIS_CLUSTER=1 $(BIN)/pytest $(PYTEST_ARGS) $(CLUSTER_TESTS)

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
