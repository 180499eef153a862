# `make demo` runs the main job end to end on this machine; `make test` runs the tests.
# Both create the virtual environment (.venv) on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-all lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -m "not study" tests

test-all: setup
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/data_engine.py
	$(BIN)/python benchmarks/trainer.py
	$(BIN)/python benchmarks/sampling.py

clean:
	rm -rf runs .pytest_cache
