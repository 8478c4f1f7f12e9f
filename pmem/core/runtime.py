"""Process-level settings for running on CPU: glibc malloc thresholds.

XLA:CPU allocates the temporaries of each execution of a compiled step as one block (tens of MiB
for the tiny models). glibc serves blocks above its mmap threshold (dynamic, capped at 32 MiB)
with a fresh ``mmap`` and unmaps them on free, so every step page-faults its whole temporary
arena in again; the cost grows with the step's temporaries, not its FLOPs. Fixed thresholds
above that size keep freed blocks in the heap for the next step. Measured on the 2-core CI
machine (``experiments/bench/modules.py``): a tiny train step takes 36 ms instead of 45-56 ms.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so launchers call
:func:`reexec_with_tuned_malloc` first thing: it restarts the interpreter once with the variable
set. A ``GLIBC_TUNABLES`` already in the environment is respected (the table benchmark sets its
own for RSS measurements); ``PMEM_MALLOC=system`` opts out.
"""

from __future__ import annotations

import os
import sys

# mmap_threshold: blocks below 256 MiB come from the heap; trim_threshold: keep up to 1 GiB of
# freed heap instead of returning it to the kernel after every step.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def tuned_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """``env`` (default: this process's) with pmem's malloc tunables, unless it already sets
  ``GLIBC_TUNABLES`` or opts out with ``PMEM_MALLOC=system``."""
  env = dict(os.environ if env is None else env)
  if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in env and env.get("PMEM_MALLOC") != "system":
    env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
  return env


def reexec_with_tuned_malloc() -> None:
  """Restart this interpreter with the same command line under :func:`tuned_env` (no-op when the
  environment already is, i.e. at most one restart)."""
  env = tuned_env()
  if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


if __name__ == "__main__":  # `GLIBC_TUNABLES=$(python -m pmem.core.runtime)` for shells and make
  print(tuned_env().get("GLIBC_TUNABLES", ""))
