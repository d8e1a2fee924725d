# `make demo`: set everything up and compress the embedded default (all-MiniLM-L6-v2) to 2:4.
# `make test`: set everything up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.squeeze-installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: 2.13.0 CPU comes from this machine's local wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/squeeze compress --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	OMP_NUM_THREADS=1 $(BIN)/python bench/prune.py

clean:
	rm -rf $(VENV) squeezed .pytest_cache
