"""pmem.core.runtime: launchers restart once with the malloc tunables, respecting the user's."""

import os
import subprocess
import sys

import pytest

from pmem.core import runtime

# prints a line each time the interpreter starts, then calls the restart twice: the restarted process
# (same pid: an exec, not a child) finds its environment tuned, so neither call restarts it again
CODE = ("import os; print('start', os.getpid(), flush=True); "
        "from pmem.core.runtime import reexec_with_tuned_malloc as r; r(); r(); "
        "print('done', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def launch(**env_over) -> tuple[list[str], str]:
  """(the pid printed by each start, GLIBC_TUNABLES at the end), checking the final pid is the same."""
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PMEM_MALLOC")}
  p = subprocess.run([sys.executable, "-c", CODE], env={**env, **env_over}, capture_output=True, text=True, check=True,
                     timeout=60)  # a restart that never stops tuning would loop
  *starts, done = p.stdout.splitlines()
  assert all(s.split()[0] == "start" for s in starts) and done.split()[0] == "done", p.stdout
  pids = [s.split()[1] for s in starts]
  assert set(pids) == {done.split()[1]}, p.stdout  # every start in the one process
  return pids, done.split(maxsplit=2)[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
@pytest.mark.parametrize("env, want, starts", [
    ({}, runtime.MALLOC_TUNABLES, 2),  # one restart, then none
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc.malloc.hugetlb=1", 1),  # the user's: no restart
    ({"PMEM_MALLOC": "system"}, "None", 1),  # opted out: no restart
])
def test_reexec_sets_tunables_once_unless_the_user_did(env, want, starts):
  pids, tunables = launch(**env)
  assert tunables == want and len(pids) == starts
