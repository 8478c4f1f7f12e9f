"""Inspection side channel: modules report what they looked up or computed, evaluation collects it.

A module calls :func:`usage` with the table rows one forward read (token ids, hashed n-gram ids,
product-key top-k indices) and :func:`stat` with a value worth summarizing (e.g. Engram's gate).
Both are no-ops (nothing is traced) unless a caller opened :func:`collect`; then each call appends
to the collector under its name, in layer order, and the decoder runs its layers unrolled so the
recorded values do not have to leave a ``scan``. Training never collects, so it costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import jax


@dataclasses.dataclass
class Collected:
  """Recorded values per name; each list has one entry per call (per layer, in order)."""
  usage: dict[str, list[tuple[jax.Array, int]]] = dataclasses.field(default_factory=dict)
  stats: dict[str, list[jax.Array]] = dataclasses.field(default_factory=dict)


_SINK: contextvars.ContextVar[Collected | None] = contextvars.ContextVar("pmem_diagnostics", default=None)


def active() -> bool:
  return _SINK.get() is not None


@contextlib.contextmanager
def collect() -> Iterator[Collected]:
  token = _SINK.set(Collected())
  try:
    yield _SINK.get()
  finally:
    _SINK.reset(token)


def usage(name: str, ids: jax.Array, num_rows: int) -> None:
  """Rows ``ids`` (any shape, ints in ``[0, num_rows)``) of a table of ``num_rows`` rows were read."""
  sink = _SINK.get()
  if sink is not None:
    sink.usage.setdefault(name, []).append((ids, int(num_rows)))


def stat(name: str, value: jax.Array) -> None:
  """A value to summarize (mean, std, quantiles) over the evaluation set."""
  sink = _SINK.get()
  if sink is not None:
    sink.stats.setdefault(name, []).append(value)
