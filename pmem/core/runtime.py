"""Process-level settings for running on CPU: glibc malloc thresholds.

XLA:CPU allocates the temporaries of each execution of a compiled step as one block (tens of MiB
for the tiny models). glibc serves blocks above its mmap threshold (dynamic, capped at 32 MiB)
with a fresh ``mmap`` and unmaps them on free, so every step page-faults its whole temporary
arena in again; the cost grows with the step's temporaries, not its FLOPs. Fixed thresholds
above that size keep freed blocks in the heap for the next step. Measured on the 2-core CI
machine (``experiments/bench/modules.py``): a tiny train step takes 36 ms instead of 45-56 ms.

The thresholds govern the main arena only. XLA's worker threads allocate from per-thread arenas,
whose heaps are capped at 64 MiB, so a larger block there is mmapped and unmapped on every step
whatever the threshold: the PKM layer step at 2^16 slots (``experiments/bench/pkm.py``) mapped its
163 MiB of temporaries anew each step, spending 20-230 ms of system time in page faults (and, with
transparent huge pages, in compaction). One arena (``arena_max=1``) puts every thread's blocks
under the thresholds: that step went from 0.27-0.44 s to 0.23-0.31 s, with no system time. The
thresholds sit above the largest step temporaries measured: the row-sparse PKM step at 2^20 slots
maps 2.0 GiB per step, and with a 256 MiB threshold spent 1.1-1.4 s of system time per 1.6-2.4 s
step re-faulting it.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so launchers call
:func:`reexec_with_tuned_malloc` first thing: it restarts the interpreter once with the variable
set. A ``GLIBC_TUNABLES`` already in the environment is respected (the table benchmark sets its
own for RSS measurements); ``PMEM_MALLOC=system`` opts out.
"""

from __future__ import annotations

import os
import sys

# mmap_threshold: blocks below 4 GiB come from the heap; trim_threshold: keep up to 8 GiB of freed
# heap instead of returning it to the kernel after every step; arena_max: one heap for all threads.
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=8589934592:"
                   "glibc.malloc.arena_max=1")


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
