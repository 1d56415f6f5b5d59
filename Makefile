# Two commands set everything up: `make demo` and `make test`. Each bootstraps .venv itself.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Pin torch and install it first: a bare `torch` lets pip pull several GB of CUDA packages.
TORCH := torch==2.13.0

.PHONY: all test demo bench lint clean

all: test

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,hf,serve]'
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null 2>&1) ; } || \
	  echo "warning: graphviz 'dot' not installed; pictures are written as .dot files only"
	touch $(STAMP)

# Types: `.venv/bin/python -m mypy` (no arguments: the files are in pyproject.toml's [tool.mypy];
# strict on pipeshift/plan.py, schedule/, optimizer/, runtime/). Run it before integrating.
test: $(STAMP)
	$(PY) -m ruff check pipeshift tests benchmarks repro
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(PY) -m pipeshift demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	$(PY) -m ruff check pipeshift tests benchmarks repro
	$(PY) -m mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
