# The platform's commands. `make demo` and `make test` bootstrap .venv from the lock file first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bootstrapped

.PHONY: demo test up down status lint bench clean repro browser brokers

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check "uv==0.13.9" \
	  && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock \
	  || $(BIN)/python -m pip install -q -r requirements.lock
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e . \
	  || $(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)
	@echo "bootstrapped $(VENV) from requirements.lock"

# The default streaming detector's step is compiled by numba on first use (~25 s) and cached beside its
# module; compiled here once, so parallel test workers and the demo's processes load it instead.
JIT := $(VENV)/.compiled
$(JIT): $(STAMP) pipelines/detectors/_contextual_jit.py
	@echo "compiling the streaming detector (numba, once per change of pipelines/detectors/_contextual_jit.py)"
	@$(BIN)/python -c "from pipelines.detectors import ContextualDetector as D; d = D(); \
	  d.unpack_states(d.pack_states([d.new_state()])); d.score_series(None, [float(i % 7) for i in range(800)])"
	@touch $(JIT)

demo: $(STAMP) $(JIT)  ## the main job end to end on embedded defaults (KEEP_UP=1 leaves the stack running)
	$(BIN)/platform demo $(if $(KEEP_UP),--keep-up,)

# Test modules run on up to 4 cores (pytest-xdist); each worker starts its own stack on free ports and a
# module stays on one worker, so its module fixtures are built once. PYTEST_ARGS= runs them in one process.
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP) $(JIT) browser brokers  ## the test suite (starts and stops its own services on free ports)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

browser:  ## Debian's headless Chromium for the UI tests (Playwright's own browser download is not used)
	@command -v chromium >/dev/null 2>&1 || test -x "$${PLATFORM_CHROMIUM:-/nonexistent}" || { \
	  echo "installing Debian chromium for the UI tests"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

brokers:  ## Debian's mosquitto and redis-server binaries: the stream tests start their own on free ports
	@command -v mosquitto >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian mosquitto and redis-server for the stream tests"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients redis-server >/dev/null; }

up: $(STAMP)    ## start the stack with the Airflow and MLflow UIs
	$(BIN)/platform up

down:
	$(BIN)/platform down

status: $(STAMP)
	$(BIN)/platform status

lint: $(STAMP)
	$(BIN)/ruff check pipelines dags tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/lake_throughput.py

clean:
	rm -rf .platform

repro: $(STAMP)  ## rebuild the DVC pipeline (data/, metrics/, plots/) from params.yaml and code
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
