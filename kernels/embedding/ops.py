"""Embedding gather / bag with dense or compact (row-sparse) gradients.

A kernel implements one primitive, ``segment_reduce(src, idx[P], seg[P] sorted, S, weights[P] | None)
-> out[S, D]`` with ``out[s] = sum_{p: seg[p] = s} weights[p] * src[idx[p]]`` (float32 accumulation,
idx outside [0, rows) skipped), and every op is built from it: the forward bag is the case
``seg = arange(S*k) // k`` (a gather is k = 1); the compact gradient sorts the ids (stable), numbers
the runs of equal ids and sums each run's cotangent rows in sorted order (deterministic, no float
atomics); the dense gradient scatters the compact one. The XLA reference uses take, segment_sum and
scatter-add directly (``xla.py``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int

from kernels import common

f32, i32 = jnp.float32, jnp.int32
MODES = ("fill", "clip")


class CompactGrad(NamedTuple):
  """Row-sparse gradient of a [V, D] table: ``rows[j]`` is the summed gradient of row ``ids[j]``.

  ``ids[:count]`` are the distinct looked-up ids, sorted; the padding slots after them hold
  ``ids == V`` (out of range, so ``.at[ids].add(..., mode="drop")`` ignores them) and zero rows. ``N``
  is the static number of looked-up ids. ``rows`` has the dtype of the cotangent ``g``.
  """
  ids: Int[Array, " N"]
  rows: Float[Array, "N D"]
  count: Int[Array, ""]

  @property
  def valid(self) -> jax.Array:
    return jnp.arange(self.ids.shape[0]) < self.count

  def to_dense(self, num_rows: int) -> Float[Array, "V D"]:
    return jnp.zeros((num_rows, self.rows.shape[1]), self.rows.dtype).at[self.ids].add(self.rows, mode="drop")


class _Backend(NamedTuple):
  bag_reduce: Callable
  compact_rows: Callable
  grads: Callable  # (table, idx [S, k], weights | None, g [S, D], num_rows) -> (dtable, float32 dweights | None)
  weight_grad: Callable  # (table, idx [S, k], g [S, D]) -> float32 [S, k]
  table_rows: Callable  # (idx [S, k], weights | None, g [S, D], num_rows) -> CompactGrad, min(S k, V) slots


def grads_of(dense_grad: Callable, weight_grad: Callable) -> Callable:
  """A backend's ``grads`` from its dense table gradient and its weight gradient."""
  def grads(table, idx, weights, g, num_rows):
    return dense_grad(idx, weights, g, num_rows), None if weights is None else weight_grad(table, idx, g)
  return grads


def _compact(compact_rows: Callable, idx, weights, g, num_rows: int) -> CompactGrad:
  """Compact gradient of ``bag_reduce(table, idx[S, k], weights)`` for cotangent g [S, D] (``S k`` slots)."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(i32)
  sid = flat[order]
  first = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
  seg = jnp.cumsum(first, dtype=i32) - 1  # run number of each sorted entry
  ok = sid < num_rows
  ids = jnp.full(flat.shape, num_rows, i32).at[seg].set(sid)  # a run writes its one id
  rows = compact_rows(g, order, seg, ok, weights)
  return CompactGrad(ids, rows, jnp.sum(first & ok, dtype=i32))


def table_rows_of(compact_rows: Callable) -> Callable:
  """A backend's ``table_rows`` from its ``compact_rows``: the compact gradient cut to ``min(S k, V)``
  slots (at most V ids are distinct; the out-of-range run sorts last)."""
  def table_rows(idx, weights, g, num_rows):
    c = _compact(compact_rows, idx, weights, g, num_rows)
    m = min(c.ids.shape[0], num_rows)
    return CompactGrad(c.ids[:m], c.rows[:m], c.count)
  return table_rows


@functools.cache
def _backend(name: str) -> _Backend:
  m = importlib.import_module(f"kernels.embedding.{name}")
  if hasattr(m, "bag_reduce"):  # xla, native: the functions themselves (native fuses both gradients)
    return _Backend(m.bag_reduce, m.compact_rows, getattr(m, "grads", None) or grads_of(m.dense_grad, m.weight_grad),
                    m.weight_grad, getattr(m, "table_rows", None) or table_rows_of(m.compact_rows))
  seg_reduce = m.segment_reduce

  def bag_reduce(src, idx, weights):
    s, k = idx.shape
    w = None if weights is None else weights.reshape(-1)
    return seg_reduce(src, idx.reshape(-1), jnp.arange(s * k, dtype=i32) // k, s, w)

  def compact_rows(g, order, seg, ok, weights):
    k = order.shape[0] // g.shape[0]
    w = None if weights is None else weights.reshape(-1)[order]
    return seg_reduce(g, jnp.where(ok, order // k, g.shape[0]), seg, order.shape[0], w)

  def dense_grad(idx, weights, g, num_rows):
    return _compact(compact_rows, idx, weights, g, num_rows).to_dense(num_rows)

  def weight_grad(table, idx, g):
    s, k = idx.shape
    rows = bag_reduce(table, idx.reshape(-1, 1), None).reshape(s, k, -1)
    return (rows.astype(f32) * g[:, None, :].astype(f32)).sum(-1)

  return _Backend(bag_reduce, compact_rows, grads_of(dense_grad, weight_grad), weight_grad, table_rows_of(compact_rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lookup(name: str, num_rows: int, table, idx, weights):
  return _backend(name).bag_reduce(table, idx, weights)


def _lookup_fwd(name, num_rows, table, idx, weights):
  """A table that is not differentiated (``stop_gradient``, a row-sparse tap) gets no dense gradient."""
  t, w = table.value, None if weights is None else weights.value
  res = (t if w is not None or table.perturbed else None, idx.value, w, table.perturbed)
  return _lookup(name, num_rows, t, idx.value, w), res


def _lookup_bwd(name, num_rows, res, g):
  table, idx, weights, table_grad = res
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  be = _backend(name)
  if table_grad:
    dtable, dweights = be.grads(table, idx, weights, g, num_rows)
  else:
    dtable, dweights = None, None if weights is None else be.weight_grad(table, idx, g)
  return dtable, None, None if weights is None else dweights.astype(weights.dtype)


_lookup.defvjp(_lookup_fwd, _lookup_bwd, symbolic_zeros=True)


def _prepare(table, ids, implementation: str, mode: str):
  """int32 ids (out-of-range -> V under "fill", clamped under "clip") and the implementation name."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  v, d = table.shape
  common.check_ids(ids, v)
  name = common.select("kernels.embedding", implementation, d, table.dtype)[0]
  idx = jnp.asarray(ids).astype(i32)
  idx = jnp.where((idx >= 0) & (idx < v), idx, v) if mode == "fill" else jnp.clip(idx, 0, v - 1)
  return idx, name


def embedding_gather(table: Float[Array, "V D"], ids: Int[Array, "..."], *, implementation: str = "auto",
                     mode: str = "fill") -> Float[Array, "... D"]:
  """``table[ids]``; its gradient w.r.t. ``table`` is the dense scatter-add of the row cotangents.

  Concrete ids outside [0, V) raise ValueError. Traced ids are not checked: ``mode="fill"`` gives
  zero rows (and no gradient) for them, ``mode="clip"`` clamps them into range (XLA's behaviour).
  """
  idx, name = _prepare(table, ids, implementation, mode)
  out = _lookup(name, table.shape[0], table, idx.reshape(-1, 1), None)
  return out.reshape(*idx.shape, table.shape[1])


def embedding_gather_compact_vjp(table: Float[Array, "V D"], ids: Int[Array, "..."], g: Float[Array, "... D"],
                                 *, implementation: str = "auto", mode: str = "fill") -> CompactGrad:
  """The gradient of ``embedding_gather`` w.r.t. ``table`` for cotangent ``g``, as a :class:`CompactGrad`."""
  idx, name = _prepare(table, ids, implementation, mode)
  return _compact(_backend(name).compact_rows, idx.reshape(-1, 1), None, g.reshape(-1, g.shape[-1]), table.shape[0])


def embedding_bag(table: Float[Array, "V D"], ids: Int[Array, "... k"], weights: Float[Array, "... k"], *,
                  implementation: str = "auto", mode: str = "fill") -> Float[Array, "... D"]:
  """``sum_j weights[..., j] * table[ids[..., j]]`` (float32 accumulation, table dtype out).

  Differentiable in ``table`` (dense scatter-add) and ``weights`` (``<g, table[ids]>``); ids as in
  :func:`embedding_gather`.
  """
  if ids.shape != weights.shape:
    raise ValueError(f"ids {ids.shape} and weights {weights.shape} must have the same shape")
  idx, name = _prepare(table, ids, implementation, mode)
  k = ids.shape[-1]
  out = _lookup(name, table.shape[0], table, idx.reshape(-1, k), weights.reshape(-1, k))
  return out.reshape(*ids.shape[:-1], table.shape[1])


def embedding_bag_table_grad(ids: Int[Array, "... k"], weights: Float[Array, "... k"], g: Float[Array, "... D"],
                             num_rows: int, *, implementation: str = "auto") -> CompactGrad:
  """The gradient of ``embedding_bag`` w.r.t. a ``[num_rows, D]`` table for cotangent ``g``, from the ids
  and weights alone, as a :class:`CompactGrad` of ``min(ids.size, num_rows)`` slots (each id's rows summed
  in row-major (s, j) order). Ids outside [0, num_rows) contribute nothing."""
  if ids.shape != weights.shape or ids.shape[:-1] != g.shape[:-1]:
    raise ValueError(f"ids {ids.shape}, weights {weights.shape} and cotangent {g.shape} disagree")
  idx, name = _prepare(jax.ShapeDtypeStruct((num_rows, g.shape[-1]), g.dtype), ids, implementation, "fill")
  k = ids.shape[-1]
  return _backend(name).table_rows(idx.reshape(-1, k), weights.reshape(-1, k), g.reshape(-1, g.shape[-1]), num_rows)


def embedding_bag_compact_vjp(table: Float[Array, "V D"], ids: Int[Array, "... k"], weights: Float[Array, "... k"],
                              g: Float[Array, "... D"], *, implementation: str = "auto",
                              mode: str = "fill") -> tuple[CompactGrad, Float[Array, "... k"]]:
  """Gradients of ``embedding_bag`` for cotangent ``g``: the table's as a :class:`CompactGrad`
  (``N = ids.size``) and the weights' (dense)."""
  idx, name = _prepare(table, ids, implementation, mode)
  k, be = ids.shape[-1], _backend(name)
  idx, w, g2 = idx.reshape(-1, k), weights.reshape(-1, k), g.reshape(-1, g.shape[-1])
  dw = be.weight_grad(table, idx, g2).astype(weights.dtype).reshape(weights.shape)
  return _compact(be.compact_rows, idx, w, g2, table.shape[0]), dw
