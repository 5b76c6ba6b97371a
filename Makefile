# Two commands on a fresh machine: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on CPU-only machines that ship it and to the CUDA wheel elsewhere;
# set TORCH_SPEC (e.g. "torch --index-url https://download.pytorch.org/whl/cu126") to choose another build.
TORCH_SPEC ?= torch==2.13.0
# policy=lerobot_* is tested in a venv of its own: lerobot needs transformers<5, the project venv has 5.x.
LEROBOT_VENV ?= .venv-lerobot
LEROBOT_PY := $(LEROBOT_VENV)/bin/python

.PHONY: install install-lerobot run test test-lerobot bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install-lerobot: $(LEROBOT_VENV)/.installed

# One resolver call for the project and the pins, then lerobot itself without its declared torch<2.11.
$(LEROBOT_VENV)/.installed: pyproject.toml tests/lerobot_adapter/requirements.txt
	$(PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_PY) -m pip install -q --upgrade pip
	$(LEROBOT_PY) -m pip install -q -r tests/lerobot_adapter/requirements.txt -e .
	$(LEROBOT_PY) -m pip install -q --no-deps lerobot==0.4.4
	touch $@

run: install
	VENV=$(VENV) bash examples/libero/run_optimized_duquant.sh $(ARGS)

test: install install-lerobot
	$(PY) -m pytest -q tests
	$(LEROBOT_PY) -m pytest -q tests/lerobot_adapter

test-lerobot: install-lerobot
	$(LEROBOT_PY) -m pytest -q tests/lerobot_adapter

bench: install
	$(PY) scripts/bench_duquant.py

clean:
	rm -rf $(VENV) $(LEROBOT_VENV) results/hydra
