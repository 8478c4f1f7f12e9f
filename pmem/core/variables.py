"""Variable types. ``MemoryTable`` marks large lookup tables so that optimizer routing
(row-sparse updates), row sharding and host offload select them by type, never by name."""

from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx


class MemoryTable(nnx.Param):
  """A table read by row lookups (token ids, hashed n-grams, product keys).

  Declared with logical axes ``("table_rows", <width>)`` (stacked layers add leading dims) and
  read only through ``pmem.memory.lookup.gather`` / ``bag``, which is what lets the train step
  update it row-sparse (``pmem.train.sparse``). Optional metadata ``index="<batch field>"`` says
  the table is read with exactly that field's ids (e.g. ``"inputs"`` for a token-indexed table),
  known before the forward: only such tables may live on the host (``pmem.train.host_tables``)."""


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def name_of(path) -> str:
  return "/".join(map(str, path))


def tables_of(params: nnx.State, select: Callable) -> dict[str, tuple[tuple, nnx.Variable]]:
  """``{name: (path, variable)}`` of the table variables ``select(name, variable)`` picks."""
  return {name_of(p): (p, v) for p, v in nnx.to_flat_state(params)
          if isinstance(v, MemoryTable) and select(name_of(p), v)}


def with_values(tables: Mapping[str, tuple[tuple, nnx.Variable]], values: Mapping[str, object]) -> nnx.State:
  """A State of the named table variables holding ``values[name]`` (same paths and metadata)."""
  return nnx.from_flat_state([(p, v.replace(values[name])) for name, (p, v) in tables.items()])


def unique(x: np.ndarray) -> np.ndarray:
  """The sorted distinct values of ``x`` (flattened): ``np.unique`` by a sort (NumPy 2.5's is ~10x slower)."""
  s = np.sort(x, axis=None)
  return s[np.concatenate([np.ones(min(s.size, 1), bool), s[1:] != s[:-1]])]


def stage_rows(name: str, table: np.ndarray, ids: np.ndarray, max_unique: int) -> dict[str, np.ndarray]:
  """``{rows [..., U, D], slots [..., U]}`` of a host table ``[..., V, D]`` for the ids a batch reads:
  the sorted unique ids (padded with ``V`` to ``U = max_unique``) and their rows (zeros after)."""
  ids, v = unique(np.asarray(ids)), table.shape[-2]
  if ids.size and (ids[0] < 0 or ids[-1] >= v):
    raise ValueError(f"host table {name!r} ({v} rows) is read with ids in [{ids[0]}, {ids[-1]}]")
  if ids.size > max_unique:
    raise ValueError(f"host table {name!r}: the batch has {ids.size} unique ids, more than the "
                     f"{max_unique} staged rows (train.optim.tables.max_unique)")
  slots = np.full((max_unique,), v, np.int32)
  slots[:ids.size] = ids
  rows = np.take(table, slots, axis=-2, mode="clip")  # one pass (padding reads row V - 1: zeroed)
  rows[..., ids.size:, :] = 0
  return {"rows": rows, "slots": np.broadcast_to(slots, rows.shape[:-1]).copy()}  # per stacked layer
