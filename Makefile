# The two commands: `make demo` and `make test`. Both create or refresh .venv idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test test-slow lint bench clean venv

venv: $(STAMP)

# torch first, pinned: a CPU wheel lies on disk here; an unpinned torch would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,bench]' '$(TORCH)'  # torch pinned: never re-resolved
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnkit train math-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
