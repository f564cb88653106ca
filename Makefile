# famjax: two commands on a fresh machine with Python 3.11.
#   make demo   sets up .venv and runs the main job (trains the demo FAM model on the built-in mixture)
#   make test   sets up .venv (with the test extras) and runs the tests
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

WORKDIR ?= workdirs/demo

.PHONY: setup setup-test demo stream-demo test bench clean

$(VENV)/.base: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "famjax needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.base requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	$(PY) -m famjax.train --config=configs/demo.py --workdir=$(WORKDIR)

stream-demo: setup
	$(PY) -m famjax.demo

# One pytest process per test file: a process that has loaded TensorFlow's data pipelines (the data and
# evaluation tests) and then compiled hundreds of XLA programs segfaulted once inside XLA's compiler
# (tests/test_model.py, which passes on its own); separate processes keep the files independent.
test: setup-test
	@set -e; for f in tests/test_*.py; do echo "== $$f"; $(PY) -m pytest -q -p no:cacheprovider $$f; done

bench: setup
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf $(VENV) bench_results workdirs
