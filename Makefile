# The README's two commands are `make demo` and `make test`. Both install into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP := True
export LITELLM_OFFLINE_MODE := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint typecheck pytest services clean

install: $(VENV)/.installed

# pip is not --quiet: a first install downloads about a gigabyte and takes minutes, and its
# Collecting / Downloading / Installing lines show where it is: progress bars on a terminal,
# "Progress N of M" lines elsewhere (CI logs), where pip would otherwise print no download progress;
# scripts/heartbeat.sh speaks up every 30 s while it unpacks (torch alone takes a while).
PIP = bash scripts/heartbeat.sh pip $(PY) -m pip install --no-input --progress-bar $$([ -t 1 ] && echo on || echo raw)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --no-input --upgrade pip
	# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

demo: install
	bash scripts/demo.sh

services:
	bash scripts/services.sh

lint: install
	$(VENV)/bin/ruff check gateway routing profiling replay tests benchmarks simulation

# mypy prints nothing until it is done: about a minute on an empty cache (.mypy_cache), a second after
typecheck: install
	bash scripts/heartbeat.sh mypy $(VENV)/bin/mypy

# The tests run in parallel (pytest-xdist): much of their time is spent waiting on the servers they start,
# so more workers than cores pay. A module that starts its servers once (module-scoped fixtures) runs on one
# worker; the longest tests (by the last run's durations in .pytest_cache; first run: the slow ones) are handed out
# first (tests/parallel.py). PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 4
# The tests marked `alone` (latency bounds that failed beside the parallel run) run after it, on their own.
PYTEST_FLAGS = -q -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder
# One BLAS/OpenMP thread per process: the workers and the servers they start already outnumber the cores, and
# OpenMP threads (scikit-learn's K-means, numpy's BLAS, torch) spin while they wait for a core: under that load a
# router fit took 19 s of CPU with the default threads and 7 s with one (the same fit, 4 busy loops beside it).
# PYTHONDONTWRITEBYTECODE emptied: a machine that sets it (some CI images do) makes every test process compile the
# project's modules again, and every pytest worker rewrite the asserts of all test modules (~8 s of CPU each).
TEST_ENV = OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=

pytest: install services
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_FLAGS) -m "not alone"
	$(TEST_ENV) $(PY) -m pytest -q -p no:xdist -m alone

test: install services lint typecheck
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_FLAGS) -m "not alone"
	$(TEST_ENV) $(PY) -m pytest -q -p no:xdist -m alone

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
