# Karyo: `make run` starts the platform on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_VAR := $(CURDIR)/var/test
SERVICES_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
SERVICES_REDIS_URL ?= redis://127.0.0.1:6379/15
PYTEST_ARGS ?=

.PHONY: run test test-embedded test-services setup migrate demo worker web clean-var schema frontend frontend-test lint

# The browser UI (frontend/): npm ci when the lock file changes, `npm run build` into frontend/dist
# (served by Django as static files) when a source changes.
NPM ?= npm
FRONTEND_SRC := $(shell find frontend/src -type f 2>/dev/null) frontend/build.mjs frontend/package.json
NODE_MODULES_STAMP := frontend/node_modules/.karyo-installed
FRONTEND_BUILD := frontend/dist/manifest.json

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Karyo needs Python 3.11 (set PYTHON=...)")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

setup: $(STAMP)

$(NODE_MODULES_STAMP): frontend/package.json frontend/package-lock.json
	@command -v $(NPM) >/dev/null || { echo "Karyo's browser UI needs Node.js 20+ and npm (apt-get install nodejs npm)"; exit 1; }
	cd frontend && $(NPM) ci --no-audit --no-fund --loglevel=error
	@touch $@

$(FRONTEND_BUILD): $(NODE_MODULES_STAMP) $(FRONTEND_SRC)
	cd frontend && $(NPM) run build --silent

frontend: $(FRONTEND_BUILD)

frontend-test: $(NODE_MODULES_STAMP)
	cd frontend && $(NPM) test --silent

run: setup frontend
	@$(PY) -m backend.karyo.runner

test: setup frontend frontend-test
	@rm -rf $(TEST_VAR)
	env -u KARYO_TEST_SERVICES -u DATABASE_URL -u KARYO_REDIS_URL KARYO_VAR_DIR=$(TEST_VAR) $(PY) -m pytest $(PYTEST_ARGS)
ifeq ($(KARYO_TEST_SERVICES),1)
	@echo "=== again on the real services: Postgres, Redis, S3 (KARYO_TEST_SERVICES=1) ==="
	@rm -rf $(TEST_VAR)
	KARYO_TEST_SERVICES=1 KARYO_VAR_DIR=$(TEST_VAR) DATABASE_URL=$(SERVICES_DATABASE_URL) \
		KARYO_REDIS_URL=$(SERVICES_REDIS_URL) $(PY) -m pytest tests/backend $(PYTEST_ARGS)
endif

# Import contracts (pyproject.toml [tool.importlinter]: the app order of docs/architecture.md, the
# engine boundary) and ruff on the whole tree. A broken contract prints the offending import chain.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

schema: setup
	$(PY) manage.py spectacular --validate --fail-on-warn --file var/schema.yml

# Label Studio (its own venv under ~/.cache/karyo, never .venv): `make labelstudio` installs it
# once and starts it on 127.0.0.1:8080 with its data in var/label-studio. `make run` starts it
# by itself when it is installed.
.PHONY: labelstudio labelstudio-install
labelstudio-install:
	@infra/labelstudio/install.sh

labelstudio: labelstudio-install
	@infra/labelstudio/start.sh
