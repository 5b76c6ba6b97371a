# Two commands on a fresh machine: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on CPU-only machines that ship it and to the CUDA wheel elsewhere;
# set TORCH_SPEC (e.g. "torch --index-url https://download.pytorch.org/whl/cu126") to choose another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: install
	VENV=$(VENV) bash examples/libero/run_optimized_duquant.sh $(ARGS)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) scripts/bench_duquant.py

clean:
	rm -rf $(VENV) results/hydra
