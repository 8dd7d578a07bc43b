# The two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# uv resolves and installs from uv.lock; it lives in its own small venv, pinned by hash.
UV_VENV := .uv
UV := $(UV_VENV)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Per-extra exports of uv.lock for plain pip (a device installs requirements/edge.txt,
# an operator's enrolment host requirements/enrol.txt).
EXPORTS := edge bridge enrol fleet loadtest

.PHONY: demo demo-scale demo-geo demo-ha test lint docs cli-docs dist system-deps stack format lock clean

demo: $(INSTALLED)
	$(BIN)/python -m fleet.demos.one_region

# 10,000 devices over 4 processes with a ×10 rate spike and a reconnect storm; a few minutes.
demo-scale: $(INSTALLED)
	$(BIN)/python -m fleet.demos.one_region --scale

# Two regions, a region outage and a partition; verifies 0 lost / 0 duplicated / 0 stuck.
demo-geo: $(INSTALLED)
	$(BIN)/python -m fleet.demos.two_regions

# One region, Redis with replicas and Sentinels: a master failover and a frozen master.
demo-ha: $(INSTALLED)
	$(BIN)/python -m fleet.demos.high_availability

# Two xdist workers (docs/explanation/testing.md); tests/conftest.py keeps what must share one.
# A plain `.venv/bin/pytest tests/x.py` stays serial (-s and debuggers work).
test: lint
	$(BIN)/pytest -n 2 --dist loadgroup

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (mkdocs-material) into site/; tests/test_docs.py runs the same strict build.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

stack: $(INSTALLED)
	$(BIN)/python -m fleet.demos.one_region --stack-only

# docs/reference/cli.md from the commands' own parsers (tests/test_cli_reference.py checks it).
cli-docs: $(INSTALLED)
	$(BIN)/python scripts/cli_reference.py

# Release artefacts into $(DIST): the sdist and the wheel built from it (setuptools pinned by
# requirements/build.txt), the device's locked requirements, and SHA256SUMS of them all.
# A device installs from these alone: docs/how-to/deploy-agent.md, tests/test_dist.py.
DIST ?= dist
dist: $(UV)
	$(UV) build --quiet --python $(PYTHON) --out-dir $(DIST) --clear \
	  --build-constraints requirements/build.txt --require-hashes
	cp requirements/edge.txt $(DIST)/requirements-edge.txt
	cd $(DIST) && sha256sum iot_orders-* requirements-edge.txt > SHA256SUMS && cat SHA256SUMS

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

system-deps:
	@scripts/ensure-system-deps.sh

$(UV): requirements/uv.txt | system-deps
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q --require-hashes -r requirements/uv.txt
	@touch $@

# Exactly the locked set: --frozen installs uv.lock as it is and never re-resolves.
$(INSTALLED): pyproject.toml uv.lock $(UV) | system-deps
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	@touch $@

# Re-resolve after editing pyproject.toml; `make lock UPGRADE=--upgrade` takes new releases.
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(UPGRADE)
	for extra in $(EXPORTS); do \
	  $(UV) export --frozen --quiet --no-dev --no-emit-project --extra $$extra \
	    --output-file requirements/$$extra.txt; \
	done
	$(UV) pip compile --quiet --generate-hashes --universal --python $(PYTHON) $(UPGRADE) \
	  requirements/build.in --output-file requirements/build.txt

clean:
	rm -rf $(VENV) $(UV_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis site .releases
