# famjax: two commands on a fresh machine with Python 3.11.
#   make demo   sets up .venv and runs the main job (trains the demo FAM model on the built-in mixture)
#   make test   sets up .venv (with the test extras) and runs the tests (make test-fast: the fast tier)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

WORKDIR ?= workdirs/demo

.PHONY: setup setup-test demo stream-demo test test-fast bench clean

$(VENV)/.base: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "famjax needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.base requirements-test.txt requirements-tpu.txt
	$(PY) -m pip install -q -r requirements-test.txt
	# libtpu off the import path (requirements-tpu.txt says why); famjax.parallel.topology finds it there
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/libtpu -r requirements-tpu.txt
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	$(PY) -m famjax.train --config=configs/demo.py --workdir=$(WORKDIR)

stream-demo: setup
	$(PY) -m famjax.demo

# tests/run_suite.py: one pytest process per test file, two files at a time, longest first; every file runs
# whatever the others did, and the last line counts the whole suite (its docstring says why and how).
# ARGS: more of run_suite.py's arguments, e.g. make test ARGS=--record (rewrite tests/durations.json)
test: setup-test
	$(PY) tests/run_suite.py $(ARGS)

# The fast tier (-m "not slow"): every package touched in a few minutes.
test-fast: setup-test
	$(PY) tests/run_suite.py --fast $(ARGS)

bench: setup
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf $(VENV) bench_results workdirs .cache
