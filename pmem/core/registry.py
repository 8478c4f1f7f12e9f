"""Name -> class registries with close-match suggestions (sequence and channel mixers)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def suggest(bad: str, known) -> str:
  """``"; did you mean 'x'?"`` for close matches of ``bad`` among ``known``, else ``""``."""
  close = difflib.get_close_matches(bad, list(known), n=3, cutoff=0.7)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown(kind: str, name: str, known) -> KeyError:
  """One-line error for an unknown name, with close matches."""
  return KeyError(f"unknown {kind} {name!r}{suggest(name, known)} (known: {', '.join(sorted(known))})")


class Registry(dict):

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def register(self, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self[name] = obj
      return obj
    return deco

  def get_or_raise(self, name: str):
    if name not in self:
      raise unknown(self.kind, name, self)
    return self[name]


SEQUENCE_MIXERS = Registry("sequence mixer")
CHANNEL_MIXERS = Registry("channel mixer")
