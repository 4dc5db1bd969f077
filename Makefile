# azaion-loader developer commands. Everything runs from the project's own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN_DIR ?= $(CURDIR)/.run

.PHONY: run test check lint types bench deb demo clean

$(BIN)/azaion-loader: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/azaion-loader

## run: the agent on local defaults (no root), with a local dev-api as its Resource API
run: venv
	$(BIN)/python scripts/run_local.py --dir $(RUN_DIR)

## test: the whole test suite (starts its own dev-api, dockerd and systemd containers)
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## check: formatting, lint, types, then the tests
check: venv
	$(BIN)/ruff format --check agent azaion_loader_dev tests bench scripts
	$(BIN)/ruff check agent azaion_loader_dev tests bench scripts
	$(BIN)/mypy agent azaion_loader_dev
	$(MAKE) test

## bench: every benchmark (each says which goals it missed; exit 1 if any missed one)
bench: venv
	@failed=""; for script in bench/bench_*.py; do echo "== $$script"; \
	  $(BIN)/python $$script || failed="$$failed $$script"; done; \
	  if [ -n "$$failed" ]; then echo "goals missed in:$$failed"; exit 1; fi

## deb: dist/azaion-loader_<version>_<arch>.deb; ARCH=amd64|arm64 (default: this machine's)
deb:
	bash packaging/build-deb.sh $(if $(ARCH),--arch $(ARCH))

demo: venv
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) dist build .run .pytest_cache
