"""Variable types. ``MemoryTable`` marks large lookup tables so that optimizer routing
(row-sparse updates), row sharding and host offload select them by type, never by name."""

from flax import nnx


class MemoryTable(nnx.Param):
  """A table read by row lookups (token ids, hashed n-grams, product keys).

  Declared with logical axes whose first entry is ``"table_rows"``."""


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)
