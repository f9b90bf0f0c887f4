# Quickstart: `make run` (sets up .venv if needed, runs the pipeline), `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=
# The data: datasets/ISBI/ when it holds the stacks, else the shared copy beside the repo (as on
# the team's machines and CI); `make run ARGS="--data-dir ..."` overrides either.
DATA_DIR ?= $(if $(wildcard datasets/ISBI/train-volume.tif),datasets/ISBI,$(if $(wildcard ../shared/data/isbi2012/train-volume.tif),../shared/data/isbi2012,datasets/ISBI))
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run segment test test-fast test-all setup clean-venv server deploy worker trigger mutation

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) flows/full_pipeline.py --data-dir $(DATA_DIR) $(ARGS)

# Segment a new volume with the champion: make segment ARGS="stack.tif [--output out.ome.zarr] ..."
# (python flows/segment.py --help lists the options).
segment: $(VENV)/.installed
	$(PY) flows/segment.py $(ARGS)

# CI's command: every test but the slow ones outside the representative slice (marker ci_slice; the
# README's Tests section has its time on 2 cores); `make test-all` runs them all.
test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow or ci_slice" $(ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

# Without the end-to-end runs on real data (slow) and the server/worker/database tests (integration).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not integration" $(ARGS)

# Mutation score of metrics, split, align, segment and the stage keys (benchmarks/mutation.py; not in
# CI, about an hour): make mutation ARGS="unet/segment.py --jobs 1"
mutation: $(VENV)/.installed
	$(PY) benchmarks/mutation.py $(ARGS)

clean-venv:
	rm -rf $(VENV)

# Deployments on a Prefect server (docs/deployment.md): `make server` in one terminal, then
# `make deploy`, `make worker` in another, `make trigger ARGS="-p preset=smoke"`. All of them talk
# to the server at PREFECT_API_URL (yours if you set it, else the one `make server` starts).
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 4200
POOL        ?= unet-pool
server deploy worker trigger: export PREFECT_API_URL ?= http://$(SERVER_HOST):$(SERVER_PORT)/api
# the UI asks the server for its API address, which otherwise assumes port 4200
server: export PREFECT_UI_API_URL ?= $(PREFECT_API_URL)

# flows/server.py runs `prefect server start`; on an address other than loopback (SERVER_HOST=0.0.0.0)
# only with PREFECT_SERVER_API_AUTH_STRING set (docs/deployment.md, "Other hosts").
server: $(VENV)/.installed
	$(PY) -m flows.server --host $(SERVER_HOST) --port $(SERVER_PORT) $(ARGS)

deploy: $(VENV)/.installed
	@$(PY) -m prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		$(PY) -m prefect work-pool create $(POOL) --type process
	UNET_DATA_DIR="$${UNET_DATA_DIR:-$(abspath $(DATA_DIR))}" $(PY) -m prefect --no-prompt deploy --all

# The venv's python runs the worker, and so the flow runs it starts (with the project's packages).
worker: $(VENV)/.installed
	$(PY) -m prefect worker start --pool $(POOL) $(ARGS)

trigger: $(VENV)/.installed
	$(PY) -m prefect deployment run 'full-pipeline/full-pipeline' $(ARGS)
