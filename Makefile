# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv with python3 when it is missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Labelled photo tree for the demo; empty means data/images/cats_vs_dogs, else the public sample.
DATA ?=
# 'imagenet' (Keras cache under KERAS_HOME, downloaded when missing), 'none', or an .h5 file.
WEIGHTS ?= imagenet
BASE ?= mobilenet_v2
PYTEST_ARGS ?=

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m flows.demo $(if $(DATA),--data "$(DATA)") --weights "$(WEIGHTS)" --base "$(BASE)"

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data/cache data/models data/reports
