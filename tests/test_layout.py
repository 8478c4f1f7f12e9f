"""The repository's shape: package import directions (../shared/design/architecture.md) and no binaries
in the tree."""

import ast
import subprocess

from tests.conftest import ROOT

# package -> the packages it may import (pmem's subpackages, kernels, configs, experiments)
ALLOWED = {
    "kernels": set(),
    "pmem/core": set(),
    "pmem/data": {"pmem/core"},
    "pmem/layers": {"pmem/core", "kernels"},
    "pmem/memory": {"pmem/core", "pmem/layers", "kernels"},
    "pmem/models": {"pmem/core", "pmem/layers", "pmem/memory", "kernels"},
    "pmem/decode": {"pmem/core", "pmem/layers", "pmem/memory", "pmem/models", "kernels"},
    "pmem/train": {"pmem/core", "pmem/data", "pmem/decode", "pmem/layers", "pmem/memory", "pmem/models", "kernels"},
    "pmem/__init__": {"pmem/train"},  # pmem.load
}
OURS = ("pmem", "kernels", "configs", "experiments")


def _package(parts: tuple[str, ...]) -> str:
  return parts[0] if parts[0] != "pmem" else "/".join(parts[:2]).removesuffix(".py")


def imports() -> dict[str, set[str]]:
  """package -> the other packages of ours that its files import (absolute imports)."""
  out: dict[str, set[str]] = {}
  for f in [*ROOT.glob("pmem/**/*.py"), *ROOT.glob("kernels/**/*.py")]:
    pkg = _package(f.relative_to(ROOT).parts)
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        parts = tuple(name.split("."))
        if parts[0] in OURS and (target := _package(parts if len(parts) > 1 else (*parts, ""))) != pkg:
          out.setdefault(pkg, set()).add(target.removesuffix("/"))
  return out


def test_packages_import_only_downwards():
  found = imports()
  assert set(found) <= set(ALLOWED), set(found) - set(ALLOWED)
  bad = {pkg: sorted(deps - ALLOWED[pkg]) for pkg, deps in found.items() if deps - ALLOWED[pkg]}
  assert not bad, f"imports against the layering: {bad}"
  assert "pmem/memory" not in found.get("pmem/layers", set())  # the cycle Q1 removed


def test_no_binaries_in_the_tree():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  binary = (".whl", ".so", ".dylib", ".egg", ".zip", ".tar.gz", ".npz", ".npy", ".safetensors", ".ckpt", ".pkl")
  assert not [f for f in tracked if f.endswith(binary)]
