# make serve: set up .venv and start Atelier on the embedded default model (port 8000).
# make test:  set up .venv and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A pinned torch: on a CPU-only machine pip takes the local CPU build; elsewhere PyPI's.
TORCH ?= torch==2.13.0
SERVE_CONFIG ?= serve_config.yaml
RAY_PORT ?= 6379
METRICS_PORT ?= 8080
DASHBOARD_PORT ?= 8265

.PHONY: serve test setup clean
setup: $(VENV)/.installed

# The last step installs the tests' watermark decoder without its dependencies, which ask
# for OpenCV with GUI libraries: the headless OpenCV and the dev extra's PyWavelets serve it.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "invisible-watermark==0.2.0"
	touch $@

# Ray runs in the foreground of `make serve` and stops with it (Ctrl-C). Prometheus scrapes
# Ray's metrics at http://127.0.0.1:$(METRICS_PORT)/metrics (see monitoring/).
# Every Ray process and client here uses token auth with the token in ~/.ray/auth_token.
serve: setup
	$(BIN)/ray get-auth-token --generate >/dev/null
	export RAY_AUTH_MODE=token; \
	$(BIN)/ray start --head --block --port=$(RAY_PORT) --metrics-export-port=$(METRICS_PORT) \
	  --dashboard-host=127.0.0.1 --dashboard-port=$(DASHBOARD_PORT) --disable-usage-stats & \
	ray_pid=$$!; trap 'kill -TERM $$ray_pid 2>/dev/null; wait $$ray_pid' EXIT INT TERM; \
	until $(BIN)/ray status --address=127.0.0.1:$(RAY_PORT) >/dev/null 2>&1; do \
	  kill -0 $$ray_pid || exit 1; sleep 1; done; \
	$(BIN)/serve run --address=127.0.0.1:$(RAY_PORT) $(SERVE_CONFIG)

# The tests run a real Redis and a real Prometheus: Debian's packages, installed if missing.
test: setup
	command -v redis-server >/dev/null && command -v prometheus >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server prometheus)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
