"""Per-token cost accounting shared by every module (the memory-module protocol's report).

Conventions (also in WORKSPACE.md):
- ``params``: parameters stored; ``active_params``: parameters a single token's forward pass
  uses (a lookup table contributes only the rows it reads).
- ``flops``: forward FLOPs per token: 2 per multiply-accumulate of every matmul; lookups and
  element-wise ops count 0; causal attention counts half of the T x T score and value products.
  Training FLOPs are 3x forward (see :func:`train_flops`).
- ``bytes_read``: bytes of parameters the token's forward pass reads (active params x itemsize).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int = 0
  active_params: int = 0
  flops: int = 0
  bytes_read: int = 0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def __mul__(self, n: int) -> "Cost":
    return Cost(*(a * n for a in dataclasses.astuple(self)))

  __rmul__ = __mul__


def dense(n_in: int, n_out: int, itemsize: int = 4) -> Cost:
  """A matmul weight read in full by every token."""
  n = n_in * n_out
  return Cost(params=n, active_params=n, flops=2 * n, bytes_read=n * itemsize)


def vector(n: int, itemsize: int = 4) -> Cost:
  """An element-wise parameter vector (norm scale, bias): read, 0 FLOPs by convention."""
  return Cost(params=n, active_params=n, flops=0, bytes_read=n * itemsize)


def lookup(rows: int, width: int, rows_read: int, itemsize: int = 4) -> Cost:
  """A table of ``rows x width`` of which each token reads ``rows_read`` rows (0 FLOPs)."""
  return Cost(params=rows * width, active_params=rows_read * width, flops=0,
              bytes_read=rows_read * width * itemsize)


def train_flops(c: Cost) -> int:
  """Forward + backward: backward costs twice the forward."""
  return 3 * c.flops
