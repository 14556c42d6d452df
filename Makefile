# The two commands: `make demo` and `make test`. Both create or refresh .venv idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test test-slow test-numpy2 lint bench clean venv

venv: $(STAMP)

# torch first, pinned: a CPU wheel lies on disk here; an unpinned torch would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,bench,math]' '$(TORCH)'  # torch pinned: never re-resolved
	touch $(STAMP)

# The core without the math extra on numpy 2, in its own venv; the same pinned torch.
NP2 := .venv-np2
MATH_TESTS := tests/test_math_data.py tests/test_math_recipe.py
$(NP2)/.installed: pyproject.toml
	test -x $(NP2)/bin/python || $(PYTHON) -m venv $(NP2)
	$(NP2)/bin/python -m pip install -q --upgrade pip
	$(NP2)/bin/python -m pip install -q $(TORCH)
	$(NP2)/bin/python -m pip install -q -e '.[dev]' '$(TORCH)' 'numpy>=2'
	touch $@

demo: $(STAMP)
	$(BIN)/attnkit train math-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# every test but the two that import mathematics-dataset (they run in `make test`)
test-numpy2: $(NP2)/.installed
	$(NP2)/bin/python -c 'import numpy; assert int(numpy.__version__.split(".")[0]) >= 2, numpy.__version__'
	$(NP2)/bin/python -m pytest -q $(addprefix --ignore=,$(MATH_TESTS))

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(NP2) build src/*.egg-info .pytest_cache
