"""The one way a memory module reads a :class:`MemoryTable`: :func:`gather` and :func:`bag`.

Outside the train step (eval, init, dense-updated tables) a read is an ordinary gather whose
gradient is the dense scatter-add (``kernels.embedding``). Inside the train step a row-sparse
table's variable holds a :class:`Tap` instead of its array (``pmem.train.sparse`` puts it there):
the rows to read from (the table itself, or the rows a host stage shipped with the batch) and one
zero *probe* per read. A read returns the rows unchanged; its backward pass gives the probe the
cotangent of every looked-up row (``[N, D]``, ``N = ids.size``, static) and the looked-up ids. So
the step obtains per-occurrence row gradients and their ids without a table-sized gradient, with
ids known before the forward (token / n-gram tables) or computed inside it (product-key top-k),
and from inside the decoder's layer scan, whose body returns nothing but the hidden states (sown
intermediates would not get out of it; cotangents of scanned inputs do).

The ids travel as the probe's cotangent: ``id + 1`` split into two float32 halves of 16 bits, both
exact; a read whose output does not reach the loss gets a zero cotangent, which decodes to "no
id" (``-1``) and is dropped. Modules stay pure functions of (variables, inputs); the only state is
a trace-time counter of reads per table (:func:`reads`), which maps the i-th read of a table in
one forward to its i-th probe.

A module must read every ``MemoryTable`` through these two functions: indexing a tapped table
(``table[...]``, ``jnp.take(table.value, ...)``) raises a TypeError naming the table.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import embedding_bag, embedding_gather

_HALF = 1 << 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe:
  """Zeros whose cotangents are the row gradients ``[..., N, D]`` and ids ``[..., N, 2]`` of one read."""
  grads: jax.Array
  ids: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tap:
  """What a row-sparse table's variable holds inside the train step.

  ``rows``: the table ``[..., V, D]``, or (host placement) the staged rows ``[..., U, D]`` of the
  sorted ids ``slots [..., U]`` (padded with ``num_rows``). ``probes``: one per read (empty while the
  step discovers the reads). Leading dims are stacked layers; the layer scan slices them."""
  rows: jax.Array
  slots: jax.Array | None
  probes: tuple[Probe, ...]
  name: str = dataclasses.field(metadata=dict(static=True))
  num_rows: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.rows.shape[:-2], self.num_rows, self.rows.shape[-1])

  @property
  def dtype(self):
    return self.rows.dtype

  @property
  def ndim(self) -> int:
    return self.rows.ndim

  def _plain(self, *_, **__):
    raise TypeError(f"MemoryTable {self.name!r} is updated row-sparse: read it with "
                    "pmem.memory.lookup.gather/bag, not by indexing or jnp ops on its value")

  __getitem__ = __jax_array__ = __array__ = _plain


class _Reads:
  """Reads per table in one trace of the forward; with ``record`` reads are plain (no probes) and
  ``sizes`` records the ``N`` of each."""

  def __init__(self, record: bool):
    self.record, self.count, self.sizes = record, {}, {}

  def next(self, name: str, n: int) -> int:
    i = self.count.get(name, 0)
    self.count[name] = i + 1
    if self.record:
      self.sizes.setdefault(name, []).append(n)
    return i


_READS: contextvars.ContextVar[_Reads | None] = contextvars.ContextVar("pmem_lookup_reads", default=None)


@contextlib.contextmanager
def reads(record: bool = False) -> Iterator[_Reads]:
  """Scope of one forward trace whose tapped reads are counted; ``record``: read without probes
  and record the reads' sizes (the train step's discovery pass, or an eval of staged rows)."""
  token = _READS.set(_Reads(record))
  try:
    yield _READS.get()
  finally:
    _READS.reset(token)


def _value(table) -> Any:
  return table.get_value() if hasattr(table, "get_value") else table


def _encode(ids: jax.Array) -> jax.Array:
  i = ids.astype(jnp.int32) + 1
  return jnp.stack([i // _HALF, i % _HALF], -1).astype(jnp.float32)


def decode(code: Float[Array, "... 2"]) -> Int[Array, "..."]:
  """The ids a probe's id cotangent carries; ``-1`` where the read did not reach the loss."""
  c = code.astype(jnp.int32)
  return c[..., 0] * _HALF + c[..., 1] - 1


@jax.custom_vjp
def _tap(rows, grads, codes, ids):
  del grads, codes, ids
  return rows


def _tap_fwd(rows, grads, codes, ids):
  del grads, codes
  return rows, ids


def _tap_bwd(ids, g):
  return g, g, _encode(ids), None


_tap.defvjp(_tap_fwd, _tap_bwd)


def _read(t: Tap, ids: jax.Array) -> jax.Array:
  """Rows ``[N, D]`` of flat ids, out-of-range ids reading zeros; no gradient to ``t.rows``."""
  rows = jax.lax.stop_gradient(t.rows)
  idx = ids.astype(jnp.int32)
  if t.slots is not None:  # host-staged rows: position of each id among the sorted staged ids
    pos = jnp.searchsorted(t.slots, idx).astype(jnp.int32)
    idx = jnp.where(t.slots[jnp.minimum(pos, t.slots.shape[0] - 1)] == idx, pos, rows.shape[0])
  return jnp.take(rows, idx, axis=0, mode="fill", fill_value=0)


def _tapped(t: Tap, ids: jax.Array) -> jax.Array:
  """Flat rows ``[N, D]`` of ``ids`` whose backward fills this read's probe."""
  if t.rows.ndim != 2:
    raise ValueError(f"MemoryTable {t.name!r}: a read sees a [rows, width] table, got {t.rows.shape}")
  ctx = _READS.get()
  if ctx is None:
    raise RuntimeError(f"MemoryTable {t.name!r} holds a Tap outside the train step's read scope")
  flat = ids.reshape(-1)
  i = ctx.next(t.name, flat.shape[0])
  rows = _read(t, flat)
  if ctx.record:
    return rows
  if i >= len(t.probes):
    raise RuntimeError(f"MemoryTable {t.name!r} is read more often than when its reads were discovered")
  p = t.probes[i]
  if p.grads.shape != rows.shape:
    raise RuntimeError(f"MemoryTable {t.name!r} read {i}: {rows.shape} rows, probe {p.grads.shape}")
  return _tap(rows, p.grads, p.ids, flat)


def gather(table, ids: Int[Array, "..."]) -> Float[Array, "... D"]:
  """``table[ids]`` for a MemoryTable (variable or array) of shape ``[V, D]``."""
  t = _value(table)
  if isinstance(t, Tap):
    return _tapped(t, ids).reshape(*ids.shape, t.rows.shape[-1])
  return embedding_gather(t, ids)


def bag(table, ids: Int[Array, "... k"], weights: Float[Array, "... k"], *,
        implementation: str = "auto") -> Float[Array, "... D"]:
  """``sum_j weights[..., j] * table[ids[..., j]]`` (an embedding bag, PKM / Memory+ reads);
  differentiable in ``weights``. ``implementation``: the kernel of an untapped read
  (``kernels.IMPLEMENTATIONS``)."""
  t = _value(table)
  if not isinstance(t, Tap):
    return embedding_bag(t, ids, weights, implementation=implementation)
  if ids.shape != weights.shape:
    raise ValueError(f"ids {ids.shape} and weights {weights.shape} must have the same shape")
  rows = _tapped(t, ids).reshape(*ids.shape, t.rows.shape[-1])
  out = jnp.einsum("...k,...kd->...d", weights.astype(jnp.float32), rows.astype(jnp.float32))
  return out.astype(t.rows.dtype)
