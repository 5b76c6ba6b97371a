# Two commands on a fresh machine: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on CPU-only machines that ship it and to the CUDA wheel elsewhere;
# set TORCH_SPEC (e.g. "torch --index-url https://download.pytorch.org/whl/cu126") to choose another build.
TORCH_SPEC ?= torch==2.13.0
# policy=lerobot_* is tested in a venv of its own: lerobot >= 0.5 needs Python >= 3.12 and torch < 2.12.
# PYTHON312: a pyenv 3.12.x (these machines), else a python3.12 on PATH that runs (a pyenv shim may refuse).
LEROBOT_VENV ?= .venv-lerobot
LEROBOT_PY := $(LEROBOT_VENV)/bin/python
PYTHON312 ?= $(or $(lastword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12)),$(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null))
# The reference simulator stack (the [reference] extra: MuJoCo 2.3.7, numpy 1.26, as openpi pins numpy<2) in a venv of
# its own, where the policies, noise, results and short real rollouts are tested too.
NUMPY1_VENV ?= .venv-numpy1
NUMPY1_PY := $(NUMPY1_VENV)/bin/python
NUMPY1_TESTS := tests/test_noise.py tests/test_results.py tests/test_embedded_policy.py::test_predict_returns_bounded_chunks \
	tests/test_embedded_policy.py::test_short_libero_rollout \
	"tests/test_runner_quant.py::test_calibration_uses_the_first_real_calls_and_is_recorded[False-1]"

.PHONY: install install-lerobot install-numpy1 run test test-main test-all test-lerobot test-numpy1 bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install-lerobot: $(LEROBOT_VENV)/.installed

# One resolver call: lerobot's newest release with what it declares (its torch, transformers) and the project.
$(LEROBOT_VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "install-lerobot needs Python 3.12: install it (e.g. pyenv install 3.12) or pass PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(LEROBOT_VENV)
	$(LEROBOT_PY) -m pip install -q --upgrade pip
	$(LEROBOT_PY) -m pip install -q -e ".[lerobot]" "pytest>=8"
	touch $@

install-numpy1: $(NUMPY1_VENV)/.installed

$(NUMPY1_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NUMPY1_VENV)
	$(NUMPY1_PY) -m pip install -q --upgrade pip
	$(NUMPY1_PY) -m pip install -q $(TORCH_SPEC) -e ".[reference,test]"
	touch $@

run: install
	VENV=$(VENV) bash examples/libero/run_optimized_duquant.sh $(ARGS)

# Three venvs, three test runs: `make -j3 test` runs them side by side (CI does). Tests marked slow (long real
# rollouts that repeat what a faster test checks on other suites) run only in test-all. The main suite runs in
# TEST_WORKERS pytest-xdist processes, a test file per process at a time (files share module fixtures).
TEST_WORKERS ?= 2
test: test-main test-lerobot test-numpy1

test-main: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-all: test
	$(PY) -m pytest -q -m slow tests

test-lerobot: install-lerobot
	$(LEROBOT_PY) -m pytest -q tests/lerobot_adapter

test-numpy1: install-numpy1
	$(NUMPY1_PY) -m pytest -q $(NUMPY1_TESTS)

bench: install
	$(PY) scripts/bench_duquant.py

clean:
	rm -rf $(VENV) $(LEROBOT_VENV) $(NUMPY1_VENV)
