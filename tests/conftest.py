"""Test setup, before JAX starts: 8 fake CPU devices for the whole session, and one JAX
compilation cache for the session (a fresh directory, shared by the xdist workers and the
processes tests launch, removed at the end): tests compile the same steps many times, mostly in
launched training processes (test_faults and test_checkpoint: 276 s without it, 119 s with it).
A test whose claim needs its processes to compile for themselves turns it off (``NO_CACHE``)."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# set by the first process of the session (pytest, or the xdist controller); its workers inherit it
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pmem-test-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
NO_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tests.registered  # noqa: E402,F401  (the test-only mixer and configs)
from tests.tolerances import tol  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLE_PYTHON = pathlib.Path(os.environ.get("PMEM_ORACLE_PYTHON", ROOT / ".venv-oracle" / "bin" / "python"))


def needs_devices(n: int):
  """Skips a test that builds an ``n``-device mesh in this process when fewer devices are present
  (an ``XLA_FLAGS`` from the environment that sets a smaller ``--xla_force_host_platform_device_count``)."""
  import jax
  have = jax.device_count()
  return pytest.mark.skipif(have < n, reason=f"needs {n} devices, this process has {have} "
                                             "(XLA_FLAGS --xla_force_host_platform_device_count)")


def run_oracle(*args: str, timeout: float = 300) -> None:
  """Runs an oracle script under the torch venv; skips (with the reason) if that venv is absent."""
  if not ORACLE_PYTHON.exists():
    pytest.skip(f"no oracle venv at {ORACLE_PYTHON}; `make oracle` creates it")
  r = subprocess.run([str(ORACLE_PYTHON), *args], capture_output=True, text=True, timeout=timeout)
  if r.returncode:
    raise AssertionError(f"oracle failed ({r.returncode}):\n{r.stderr[-4000:]}")


def run_launcher(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
  """``python -m experiments.train ARGS`` in a fresh process from the repo root."""
  e = {**os.environ, **(env or {})}
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=timeout)


# per-step losses of `tiny` (one run vs another on other devices, meshes or processes): a loss is the
# mean of B·T = 16·64 token nlls (≈ log V each) summed in the sharding's order, and the gradients'
# sums over shards change order as much, carried into the next steps relatively (Adam)
LOSS_TOL = tol(np.float32, math.log(256), 16 * 64)  # ≈ 1.2e-4 relative, 7e-4 absolute


def read_losses(workdir) -> list[float]:
  """Per-step losses from a run's metrics.jsonl."""
  rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [r["loss"] for r in rows if "loss" in r]


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
