# make demo  : install, then ingest a task folder and train on it from the cache (local Ray, local disk, bundled model)
# make test  : install, then run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= ../shared/data/tasks
DEMO_TASK ?= $(DATA)/chemprot

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch first: an exact pin takes the CPU build lying on disk; a loose one would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: install
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q

demo: install
	RAY_AUTH_MODE=disabled $(BIN)/er demo $(DEMO_TASK) --overwrite

bench: install
	RAY_AUTH_MODE=disabled $(BIN)/er bench --out benchmarks/REPORT.md

clean:
	rm -rf $(VENV) .er-demo .pytest_cache
