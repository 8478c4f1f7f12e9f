"""pmem.core.runtime: launchers restart once with the malloc tunables, respecting the user's."""

import os
import subprocess
import sys

import pytest

from pmem.core import runtime

CODE = ("import os; from pmem.core.runtime import reexec_with_tuned_malloc as r; r(); "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def launch(**env_over) -> tuple[int, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PMEM_MALLOC")}
  p = subprocess.run([sys.executable, "-c", CODE], env={**env, **env_over}, capture_output=True, text=True, check=True)
  pid, tunables = p.stdout.split(maxsplit=1)
  return int(pid), tunables.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
@pytest.mark.parametrize("env, want", [
    ({}, runtime.MALLOC_TUNABLES),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc.malloc.hugetlb=1"),
    ({"PMEM_MALLOC": "system"}, "None"),
])
def test_reexec_sets_tunables_once_unless_the_user_did(env, want):
  assert launch(**env)[1] == want
