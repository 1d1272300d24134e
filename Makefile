# Everything the project needs is installed by these targets into .venv (nothing by hand).
# torch and every other dependency are pinned by constraints.txt for reproducible runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-all lint demo bench bench-quick bench-protocol gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# The fast tier (a few minutes): every verb end to end on tiny data, the bad-input contract, the
# format owners, the statistics. The slow statistical, concurrency and scheduler tests are marked
# slow and run by test-all, which CI runs (.ci/run).
test: lint
	$(BIN)/pytest -q -ra -m "not slow" --durations=15

test-all: lint
	$(BIN)/pytest -q -ra --durations=15

demo: $(STAMP)
	$(BIN)/nmosd-ms demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# The full paper protocol for two-view-18 (15 x 5 folds, 88 subjects, 100^3, 100 epochs), timed.
BENCH_DIR ?= bench-protocol
bench-protocol: $(STAMP)
	rm -rf $(BENCH_DIR)
	$(BIN)/nmosd-ms phantom $(BENCH_DIR)/cohort
	$(BIN)/nmosd-ms prepare $(BENCH_DIR)/cohort --out $(BENCH_DIR)/prepared --size 100
	$(BIN)/nmosd-ms cv $(BENCH_DIR)/prepared --out $(BENCH_DIR)/run --models twoview-18 \
		--executor dask --workers 2 --threads 1 --precision bf16 --eval-every 100
	$(BIN)/python -m benchmarks.protocol $(BENCH_DIR)/run

# The wheel folder scripts/gpu_check.sh installs from on a GPU machine without internet.
gpu-wheels: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_wheels --out wheels

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(BENCH_DIR) .pytest_cache .ruff_cache
