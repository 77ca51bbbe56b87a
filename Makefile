# make serve: set up .venv and start Atelier on the embedded default model (port 8000).
# make test:  set up .venv and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A pinned torch: on a CPU-only machine pip takes the local CPU build; elsewhere PyPI's.
TORCH ?= torch==2.13.0

.PHONY: serve test setup clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

serve: setup
	$(BIN)/serve run serve_config.yaml

# The shared-state tests run a real Redis: Debian's redis-server, installed here if missing.
test: setup
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
