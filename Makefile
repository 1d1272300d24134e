# Everything the project needs is installed by these targets into .venv (nothing by hand).
# torch and every other dependency are pinned by constraints.txt for reproducible runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test lint demo bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/pytest -q -ra

demo: $(STAMP)
	$(BIN)/nmosd-ms demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
