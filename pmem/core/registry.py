"""Name -> object registries, one mechanism for every kind pmem names on a command line: configs and
fiddlers (``configs``), sequence and channel mixers (the memory modules among them).

A registry knows the packages whose modules register into it and imports all of them before its first
lookup, so what is registered never depends on which module happened to be imported first; an unknown
name raises one line naming the kind, the close matches and the known names."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def suggest(bad: str, known) -> str:
  """``"; did you mean 'x'?"`` for close matches of ``bad`` among ``known``, else ``""``."""
  close = difflib.get_close_matches(bad, list(known), n=3, cutoff=0.7)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class UnknownName(KeyError):
  """An unknown registered name; ``str()`` is the one-line message (a KeyError's would be quoted)."""

  def __str__(self) -> str:
    return self.args[0]


def unknown(kind: str, name: str, known) -> UnknownName:
  """One-line error for an unknown name, with close matches."""
  return UnknownName(f"unknown {kind} {name!r}{suggest(name, known)} (known: {', '.join(sorted(known))})")


class Registry(Mapping):
  """``name -> object`` with a one-line description each; ``packages``: whose modules (all but those named
  ``_*``) register here, imported by :meth:`load` before the first lookup."""

  def __init__(self, kind: str, packages: tuple[str, ...] = ()):
    self.kind, self.packages = kind, packages
    self._items: dict[str, Any] = {}
    self._docs: dict[str, str] = {}
    self._loaded = False

  def register(self, name: str, doc: str = "") -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._items[name], self._docs[name] = obj, doc
      return obj
    return deco

  def load(self) -> None:
    """Imports every module of ``packages`` once (what registers here)."""
    if self._loaded:
      return
    self._loaded = True
    for package in self.packages:
      for m in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not m.name.startswith("_"):
          importlib.import_module(f"{package}.{m.name}")

  def __getitem__(self, name: str):
    self.load()
    if name not in self._items:
      raise unknown(self.kind, name, self._items)
    return self._items[name]

  def __iter__(self) -> Iterator[str]:
    self.load()
    return iter(self._items)

  def __len__(self) -> int:
    self.load()
    return len(self._items)

  def doc(self, name: str) -> str:
    if name not in self:
      raise unknown(self.kind, name, self._items)
    return self._docs[name]


MODULES = ("pmem.layers", "pmem.memory")  # the packages whose modules register mixers
SEQUENCE_MIXERS = Registry("sequence mixer", MODULES)
CHANNEL_MIXERS = Registry("channel mixer", MODULES)
