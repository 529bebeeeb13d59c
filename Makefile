# twostep: `make run` serves the app, `make test` runs the whole suite (both from a fresh clone).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5000
STAMP := $(VENV)/.installed

.PHONY: run test install clean lock

LOCK := requirements.lock

# The dependencies come from requirements.lock, each at the version and with the hashes recorded there (the
# app's own dependencies' dependencies too: a new Werkzeug or Jinja2 release cannot change a fresh install);
# then the app itself, editable, with nothing more.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Make requirements.lock again from pyproject.toml: the newest releases its pins allow, with their hashes
# (pip-tools, in a throwaway virtualenv). Run after changing a pin; `make install` then installs the result.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools==7.7.0
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host --no-header --output-file $(LOCK).new pyproject.toml
	{ sed -n '1,/^# change there/p' $(LOCK); cat $(LOCK).new; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK) && rm $(LOCK).new
	rm -rf .venv-lock

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gunicorn --config gunicorn.conf.py --bind 127.0.0.1:$(PORT) wsgi:app

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache

# The whole suite against a throwaway PostgreSQL 15 cluster (scripts/pg.sh starts it and always stops it).
.PHONY: test-postgres bench
test-postgres: $(STAMP)
	bash scripts/pg.sh run $(BIN)/python -m pytest

# Throughput and latency under gunicorn (see README "Performance" and docs/performance.md); writes bench/results.json.
bench: $(STAMP)
	$(BIN)/python bench/run.py

# A PNG of every step of the journey, taken in Chromium from a throwaway server (README "Screenshots").
.PHONY: screenshots
screenshots: $(STAMP)
	$(BIN)/python tests/e2e/screenshots.py docs/screenshots

# Dependency audit (security.md 44): pip-audit, installed into the venv by this target only, checks every
# installed package against the PyPI/OSV advisory data. --strict fails when a package cannot be checked
# (e.g. no route to the advisory service) instead of passing silently. Not part of .ci/run: the CI machine
# cannot reach PyPI's vulnerability API or osv.dev (README "Security").
.PHONY: audit
audit: $(STAMP)
	$(BIN)/pip install --quiet pip-audit
	$(BIN)/pip-audit --strict --skip-editable
