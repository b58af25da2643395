# Thin wrapper over the package CLI. `make reproduce` and `make test` are the README's two
# commands; both create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PERSONAS ?= default
SIZE     ?= tiny

.PHONY: setup reproduce test test-fast bench lab clean-runs

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

reproduce: $(STAMP)
	$(PY) -m character_training reproduce --personas $(PERSONAS) --size $(SIZE)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/sampling_throughput.py
	$(PY) bench/sft_throughput.py
	$(PY) bench/snapshot_fidelity.py
	$(PY) bench/dpo_throughput.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs reports/*/
