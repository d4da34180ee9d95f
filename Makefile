# One-command set-up: `make serve` to run, `make test` to test. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU build on disk; an unpinned torch may pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEPS_STAMP := $(VENV)/.deps-stamp
MODELS_STAMP := $(VENV)/.models-stamp
# Test processes (pytest-xdist); each starts its own session stacks (redis-server, real and echo stacks).
TEST_WORKERS ?= 2

.PHONY: dev serve test lint bench bench-memory clean

dev: $(MODELS_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEPS_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

# Pulls are idempotent: a materialized model is reused, so this is quick the second time.
$(MODELS_STAMP): $(DEPS_STAMP)
	$(BIN)/ollm models pull smollm2-135m-instruct
	$(BIN)/ollm models pull all-minilm-l6-v2
	touch $@

serve: dev
	$(BIN)/ollm serve

test: dev
	$(BIN)/ruff check ollm workers server cli tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

lint: dev
	$(BIN)/ruff check ollm workers server cli tests bench
	$(BIN)/mypy

bench: dev
	$(BIN)/python -m bench.run

# Each family's 2 GB checkpoint under a quarter of its size: peak RSS, decode at 1 and 16 streams, the
# greedy text against the resident model (about 5 minutes a family; docs/memory.md).
bench-memory: dev
	for family in llama gemma3 gpt-oss qwen3-next; do \
		$(BIN)/python -m bench.layer_streaming --family $$family --budget 512MiB --text-check || exit 1; \
	done

clean:
	rm -rf $(VENV)
