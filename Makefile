# The two commands of the quick start: `make demo` and `make test`.
# Both bootstrap a venv in .venv with labkit installed (editable) and its test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labkit-installed

.PHONY: demo test lint bench clean lab-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/invoke demo

test: $(STAMP)
	$(BIN)/ruff check labkit tests tasks.py bench
	$(BIN)/python tests/suite.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check labkit tests tasks.py bench

bench: $(STAMP)
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/power_fanout.py
	$(BIN)/python bench/deploy.py
	$(BIN)/python bench/tracker.py
	$(BIN)/python bench/migrate.py

lab-down: $(STAMP)
	$(BIN)/invoke lab.down

clean:
	rm -rf $(VENV) .lab results .pytest_cache
