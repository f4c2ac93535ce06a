# stepflow's one command table: CI calls these targets exactly as they are.
# Everything runs from the project venv, which `make venv` builds from nothing but python3.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Touched after a successful install; pip runs again whenever pyproject.toml is newer.
STAMP := $(VENV)/.stepflow-installed

TESTS ?= tests
PYTEST_ARGS ?=
# pytest-xdist workers (`0`: one process); a test file stays on one worker (--dist loadfile),
# so its module fixtures (servers, npm ci) run once.
TEST_WORKERS ?= auto
BENCH_ARGS ?=
DEMO_ARGS ?=
# `make test-pg` uses this unless the variable is already set in the environment.
STEPFLOW_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: help venv gen check-gen buf-lint buf-breaking proto-release lint test test-pg bench bench-failover bench-remote soak soak-web demo clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PYTEST_ARGS='-k x -x'  TESTS=tests/unit  TEST_WORKERS=0  PYTHON=python3.11"

venv: $(STAMP) ## create .venv and install the project with its [dev] extras

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "stepflow needs Python >= 3.11; set PYTHON=... (found: $$($(PYTHON) --version 2>&1))" >&2; exit 1; }
	@if [ ! -x "$(BIN)/python" ]; then \
		echo "creating $(VENV) with $$($(PYTHON) --version)"; \
		$(PYTHON) -m venv "$(VENV)"; \
	fi
	@if [ ! -f "$(STAMP)" ]; then \
		echo "installing stepflow and its dev tools into $(VENV) (first run: a minute or two)"; \
		"$(BIN)/python" -m pip install --disable-pip-version-check -e '.[dev]'; \
	else \
		echo "pyproject.toml changed: re-installing into $(VENV)"; \
		"$(BIN)/python" -m pip install --disable-pip-version-check --quiet -e '.[dev]'; \
	fi
	@touch "$(STAMP)"

gen: venv ## regenerate stepflow_proto/ from protos/, and the blocking client from the asyncio one
	"$(BIN)/python" scripts/gen_protos.py
	"$(BIN)/python" scripts/gen_sync_client.py

check-gen: venv ## fail if stepflow_proto/ or stepflow_client/_sync.py is stale
	"$(BIN)/python" scripts/gen_protos.py --check
	"$(BIN)/python" scripts/gen_sync_client.py --check

buf-lint: venv ## buf lint (STANDARD rules) on protos/
	cd protos && "$(BIN)/buf" lint

# The protos as last released: a change that would break a deployed client fails `make test`.
RELEASED_PROTOS := protos/released/stepflow-v1.json

buf-breaking: venv ## buf breaking (FILE rules) against the last released protos
	"$(BIN)/buf" breaking protos --against $(RELEASED_PROTOS)

proto-release: venv ## record protos/ as released (run when tagging a release)
	"$(BIN)/buf" build protos -o $(RELEASED_PROTOS)

# Runs every linter even when an earlier one fails, so one run shows all findings.
lint: venv ## buf lint, buf breaking, ruff check, ruff format --check, mypy
	@failed=""; \
	echo "== buf lint";          (cd protos && "$(BIN)/buf" lint)   || failed="$$failed buf"; \
	echo "== buf breaking";      "$(BIN)/buf" breaking protos --against $(RELEASED_PROTOS) \
	                                                                || failed="$$failed buf-breaking"; \
	echo "== ruff check";        "$(BIN)/ruff" check .              || failed="$$failed ruff-check"; \
	echo "== ruff format --check"; "$(BIN)/ruff" format --check .   || failed="$$failed ruff-format"; \
	echo "== mypy";              "$(BIN)/mypy"                      || failed="$$failed mypy"; \
	if [ -n "$$failed" ]; then echo "lint failed:$$failed" >&2; exit 1; fi; \
	echo "lint clean"

test: venv ## check-gen, lint (buf, ruff, mypy), then pytest (extra args: PYTEST_ARGS=...)
	$(MAKE) --no-print-directory check-gen
	$(MAKE) --no-print-directory lint
	"$(BIN)/pytest" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) $(TESTS)

test-pg: ## `make test` with PostgreSQL required (STEPFLOW_TEST_POSTGRES_URL)
	STEPFLOW_TEST_POSTGRES_URL='$(STEPFLOW_TEST_POSTGRES_URL)' STEPFLOW_TEST_REQUIRE_POSTGRES=1 \
		$(MAKE) --no-print-directory test

bench: venv ## run the benchmarks (bench/run_all.py)
	@if [ -f bench/run_all.py ]; then \
		"$(BIN)/python" bench/run_all.py $(BENCH_ARGS); \
	else \
		echo "bench/run_all.py is missing: no benchmarks to run"; \
	fi

bench-failover: venv ## kill -9 an orchestrator mid-job: time to adoption and to the first re-run child vs the lease
	"$(BIN)/python" bench/bench_failover.py $(BENCH_ARGS)

bench-remote: venv ## one step local vs on two runners of 8 slots (RabbitMQ): children/s and what bounds it
	"$(BIN)/python" bench/bench_remote.py $(BENCH_ARGS)

soak-web: venv ## the web view: 50 pages open on a busy job for an hour, the monitor's RSS over time
	"$(BIN)/python" bench/bench_web.py --part soak --runs 1 --soak-seconds 3600 $(BENCH_ARGS)

soak: venv ## bounded soak (~2 min, loopback): RSS/fds over time (SOAK_ARGS='--seconds 600 --db postgres')
	"$(BIN)/python" bench/soak.py $(SOAK_ARGS)

demo: venv ## run the demo job end to end on the embedded SQLite default
	"$(BIN)/python" -m orchestrator_svc.demo $(DEMO_ARGS)

clean: ## remove caches and build output (keeps .venv and databases)
	rm -rf build dist ./*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf "$(VENV)"
