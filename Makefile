# Quickstart: `make run` (sets up .venv if needed, runs the pipeline), `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=
# The data: datasets/ISBI/ when it holds the stacks, else the shared copy beside the repo (as on
# the team's machines and CI); `make run ARGS="--data-dir ..."` overrides either.
DATA_DIR ?= $(if $(wildcard datasets/ISBI/train-volume.tif),datasets/ISBI,$(if $(wildcard ../shared/data/isbi2012/train-volume.tif),../shared/data/isbi2012,datasets/ISBI))
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test test-all setup clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) flows/full_pipeline.py --data-dir $(DATA_DIR) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
