# Two entry points: `make demo` (rlino's main job on the built-in tiny model) and `make test`.
# Both create or reuse the virtual environment in .venv; torch is pinned first (a local CPU wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlino-installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlino demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Benchmark environment: rlino plus its peers (TRL), kept apart from .venv so that TRL never
# becomes a dependency of rlino or of its tests. torch is pinned first (a local CPU wheel).
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.rlino-bench-installed

$(BENCH_STAMP): pyproject.toml benchmarks/requirements.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

.PHONY: bench-env
bench-env: $(BENCH_STAMP)
