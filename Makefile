# Switchboard: `make run` runs the native stack, `make test` runs the tests.
# Both install what they need first (Debian/Ubuntu packages, the virtualenv).
SHELL := /bin/bash
.SHELLFLAGS := -o errexit -o nounset -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The static checks' tools (checkov, hadolint, ...) live in a virtualenv of their own.
VALIDATORS ?= .venv-validators
# Debian packages only the tests need: PostgreSQL for the e2e run against a real database,
# envsubst (gettext-base) to render the nginx template as the nginx image does, Chromium for the
# browser test (tests/browser, driven by Playwright; its own browser download is never used),
# iproute2 (`ip`) for the network namespaces of tests/static/sentinel_pods.py, compose_redis.py,
# Node.js with Debian's `ws` module for the README's JavaScript client (tests/browser/test_cli_client.py),
# Prometheus and promtool for the metrics, alert-rule and dashboard tests (tests/e2e/test_prometheus.py).
TEST_PACKAGES ?= postgresql gettext-base chromium iproute2 nodejs node-ws prometheus
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k chat -x"`.
PYTEST_ARGS ?=

.PHONY: help run start stop status test lint format lock createsuperuser system-deps test-system-deps venv validators clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

run: system-deps venv  ## Run the whole stack in the foreground on https://localhost:8443 (Ctrl-C stops it)
	exec $(BIN)/python -m infra.stack run

start: system-deps venv  ## Start the stack in the background and wait until it is ready
	$(BIN)/python -m infra.stack start

stop:  ## Stop a stack started with `make start`
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.stack stop; else echo "nothing to stop"; fi

status:  ## Show the background stack's processes
	$(BIN)/python -m infra.stack status

test: system-deps test-system-deps venv validators  ## Run the whole test suite (unit, consumer, end-to-end, static checks)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv  ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

createsuperuser: venv  ## Create an admin user for the native stack
	$(BIN)/python -m infra.stack manage createsuperuser

settings-table: venv  ## Regenerate the README's settings and metrics tables (app/config/env.py, app/observability/metrics.py)
	$(BIN)/python app/config/env.py --write-readme README.md
	cd app && ../$(BIN)/python -m observability.metrics --write-readme ../README.md

lock: venv  ## Re-pin requirements/*.txt from pyproject.toml
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o requirements/main.txt
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet --extra dev -o requirements/dev.txt
	$(BIN)/uv pip compile requirements/validators.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet --generate-hashes -o requirements/validators.txt

system-deps:
	@infra/install-system-deps.sh

test-system-deps:
	@infra/install-system-deps.sh $(TEST_PACKAGES)

venv: $(VENV)/.installed

validators:  ## Create the validators' virtualenv (pinned, hashed: requirements/validators.txt)
	@infra/install-validators.sh $(VALIDATORS)

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	# The project itself, for the switchboard-loadtest console script (dependencies are pinned above).
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

clean: stop  ## Remove the virtualenv, runtime files and the SQLite database
	rm -rf $(VENV) $(VALIDATORS) .run var .pytest_cache .ruff_cache
