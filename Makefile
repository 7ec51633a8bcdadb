# Two commands: `make demo` runs the main job, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest stress bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

DEMO_STAMP := $(VENV)/.installed-demo

# the demo's environment adds the service and the pictures (issue 13): the core install stays lean
$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[serve,plots]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/xpstore demo

# the coverage floor: today's line coverage of the package, rounded down (see README)
COV_FLOOR := 92

test: $(STAMP)
	$(BIN)/ruff check xpstore tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --cov=xpstore --cov-report=term --cov-fail-under=$(COV_FLOOR)
	$(BIN)/python -m coverage report --fail-under=$(COV_FLOOR) > /dev/null  # pytest-cov's own check was seen exiting 0

stress: $(STAMP)
	$(BIN)/python -m pytest -q --stress -m stress

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/knn.py
	$(BIN)/python benchmarks/sampling.py --sections memory,store

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
