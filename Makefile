# Two commands for a fresh machine:
#   make demo   set up the environment, then train DeepCNN on the embedded sample data with Ray Train
#   make test   set up the environment, then run the test suite
VENV ?= $(HOME)/.cache/places365-ray/venv
PY := $(VENV)/bin/python
# moto's S3 server for tests/test_object_storage.py, in a venv of its own (scripts/setup.sh)
MOTO_VENV ?= $(dir $(VENV))moto-venv
export VENV MOTO_VENV
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-fast lint bench bench-tools mutate notebook promote help

help:
	@echo "make demo   - set up and train on the embedded sample data (ARGS='...' adds flags)"
	@echo "make test   - set up and run the tests (PYTEST_ARGS='...' adds pytest flags)"
	@echo "make setup  - only create/update the virtual environment in $(VENV)"
	@echo "make lint   - ruff check and ruff format --check (the pinned ruff; 'ruff format .' fixes layout)"
	@echo "make bench  - run every benchmark in benchmarks/ (tables for docs/benchmarks.md)"
	@echo "make mutate - deliberate bugs in a fresh clone each, against their tests (MUTATE_ARGS='--fast')"
	@echo "make notebook - JupyterLab (own venv) with the project's kernel, on notebooks/workshop.ipynb"
	@echo "make promote CHECKPOINT=latest - swap a checkpoint into the running endpoint, in place"

setup:
	@scripts/setup.sh

demo: setup
	$(PY) rayjobs/train.py $(ARGS)

# 2 pytest processes, each with its own Ray head (tests/conftest.py says why and how tests are
# grouped); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-tools:
	@scripts/bench_tools.sh

bench: setup bench-tools
	$(PY) benchmarks/input.py
	$(PY) benchmarks/compute.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/gpu_train.py
	$(PY) benchmarks/data_check.py

notebook: setup
	@scripts/notebook.sh

# The running endpoint (`serve deploy serving/config.yaml`) swaps to CHECKPOINT in place: a run dir,
# a sweep's best.json, a checkpoint dir or latest[:STORAGE_PATH] (docs/serving.md).
promote: setup
	@test -n "$(CHECKPOINT)" || { echo "make promote: give CHECKPOINT=PATH (or latest)" >&2; exit 2; }
	$(PY) serving/promote.py "$(CHECKPOINT)" $(ARGS)

# Not part of `make test`: each mutation clones the repo (HEAD) and runs the tests that guard it.
mutate: setup
	$(PY) scripts/mutate.py $(MUTATE_ARGS)
