"""Test cases derived from the config registry, never listed by hand: every registered config (and the test-only
ones of ``tests/registered.py``) is a case of the per-config tests, and ``make test`` runs the subset a rule picks —
one config per distinct thing the test exercises — while ``make test-slow`` runs the rest (``slow``).

- :func:`classes`: the module classes a config's model builds (the mixers, memories and shared modules);
- :func:`state_kinds`: for each of them with a decode state, the class that implements it (``init_state``'s
  owner: LinearRecurrence for linear attention, GLA, DeltaNet, Gated DeltaNet and retention), and ``"ring"``
  where an attention has a sliding window (its cache a ring buffer);
- :func:`first_per`: the first config (tiny first, then shortest name) of each distinct value of a key."""

from __future__ import annotations

import functools

import fiddle as fdl
import pytest
from flax import nnx

import configs
from configs import cli


def _buildables(value):
  """Every Buildable under ``value`` (tuples, lists and dicts followed), outermost first."""
  if isinstance(value, fdl.Buildable):
    yield value
    value = list(fdl.ordered_arguments(value).values())
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    for v in value:
      yield from _buildables(v)


@functools.cache
def config(name: str) -> fdl.Config:
  return cli.build_config([f"config:{name}"])


@functools.cache
def classes(name: str) -> frozenset[type]:
  return frozenset(c for c in map(fdl.get_callable, _buildables(config(name).model))
                   if isinstance(c, type) and issubclass(c, nnx.Module))


@functools.cache
def state_kinds(name: str) -> frozenset:
  kinds = {next(k for k in c.__mro__ if "init_state" in vars(k)) for c in classes(name)
           if callable(getattr(c, "init_state", None))}
  ring = any(fdl.ordered_arguments(b).get("window") is not None for b in _buildables(config(name).model))
  return frozenset(kinds | ({"ring"} if ring else set()))  # an attention with a window: its cache a ring


def layered(name: str) -> bool:
  """Layers of more than one kind (overrides: hybrids, periods, memory schedules)."""
  return bool(config(name).model.overrides)


def registered() -> list[str]:
  """Every registered config whose model has a decode state or a memory module (in practice: all)."""
  return sorted(n for n in configs.CONFIGS
                if state_kinds(n) or any(c.__module__.startswith("pmem.memory") for c in classes(n)))


def first_per(key, names=None) -> set[str]:
  """The first config (``tiny``-like names first, then the shortest) of each distinct ``key(name)``."""
  out = {}
  for n in sorted(names or registered(), key=lambda n: (not (n == "tiny" or n.endswith("_tiny")), len(n), n)):
    out.setdefault(key(n), n)
  return set(out.values())


def cases(fast: set[str], names=None, *extra) -> list:
  """``(name, *extra)`` for every config, marked ``slow`` unless in ``fast``."""
  return [((n, *extra) if extra else n) if n in fast else pytest.param(n, *extra, marks=pytest.mark.slow)
          for n in names or registered()]
