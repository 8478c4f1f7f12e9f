"""Fiddle configs and fiddlers, registered by name.

A config is a function returning an ``fdl.Config`` of :class:`pmem.train.loop.Experiment`; a
fiddler is a function that edits such a config in place (an ablation). Each paper gets its
own module here; every module in this package is imported so its names register.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import fiddle as fdl

CONFIGS: dict[str, tuple[Callable[[], fdl.Config], str]] = {}
FIDDLERS: dict[str, tuple[Callable[..., None], str]] = {}


def _register(table, name: str, doc: str):
  def deco(fn):
    if name in table:
      raise ValueError(f"{name!r} registered twice")
    table[name] = (fn, doc)
    return fn
  return deco


def config(name: str, doc: str):
  return _register(CONFIGS, name, doc)


def fiddler(name: str, doc: str):
  return _register(FIDDLERS, name, doc)


def load_all() -> None:
  for m in pkgutil.iter_modules(__path__):
    if not m.name.startswith("_") and m.name != "cli":
      importlib.import_module(f"{__name__}.{m.name}")
