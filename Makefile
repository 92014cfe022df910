# podserve: the two commands are `make run` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_REPOSITORY ?= model_repository
TOOLS := .tools/bin

.PHONY: run test lint install install-test demo-models tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime + demo-model build tools.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[demo,test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(MODEL_REPOSITORY)/.built: $(VENV)/.installed
	$(BIN)/podserve models build-demo $(MODEL_REPOSITORY)
	touch $@

demo-models: $(MODEL_REPOSITORY)/.built

run: $(MODEL_REPOSITORY)/.built
	PODSERVE_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/podserve serve

# A real helm binary, installed by the project's own script (no cluster needed).
tools: $(VENV)/.installed-test
	PATH=$(BIN):$$PATH sh helm/tools/install-helm $(TOOLS)

test: install-test tools
	$(BIN)/ruff check service tests loadtests
	PATH=$(abspath $(TOOLS)):$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check service tests loadtests
	$(BIN)/ruff format --check service tests loadtests

clean:
	rm -rf $(VENV) $(TOOLS) $(MODEL_REPOSITORY) .pytest_cache
