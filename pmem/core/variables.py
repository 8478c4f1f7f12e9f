"""Variable types. ``MemoryTable`` marks large lookup tables so that optimizer routing
(row-sparse updates), row sharding and host offload select them by type, never by name."""

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
