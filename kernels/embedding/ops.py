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
  ids: Int[Array, "N"]
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


def grads_of(dense_grad: Callable, weight_grad: Callable) -> Callable:
  """A backend's ``grads`` from its dense table gradient and its weight gradient."""
  def grads(table, idx, weights, g, num_rows):
    return dense_grad(idx, weights, g, num_rows), None if weights is None else weight_grad(table, idx, g)
  return grads


def _compact(be: _Backend, idx, weights, g, num_rows: int) -> CompactGrad:
  """Compact gradient of ``bag_reduce(table, idx[S, k], weights)`` for cotangent g [S, D]."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(i32)
  sid = flat[order]
  first = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
  seg = jnp.cumsum(first, dtype=i32) - 1  # run number of each sorted entry
  ok = sid < num_rows
  ids = jnp.full(flat.shape, num_rows, i32).at[seg].set(sid)  # a run writes its one id
  rows = be.compact_rows(g, order, seg, ok, weights)
  return CompactGrad(ids, rows, jnp.sum(first & ok, dtype=i32))


@functools.cache
def _backend(name: str) -> _Backend:
  m = importlib.import_module(f"kernels.embedding.{name}")
  if hasattr(m, "bag_reduce"):  # xla, native: the functions themselves (native fuses both gradients)
    return _Backend(m.bag_reduce, m.compact_rows, getattr(m, "grads", None) or grads_of(m.dense_grad, m.weight_grad),
                    m.weight_grad)
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
    return _compact(be, idx, weights, g, num_rows).to_dense(num_rows)

  def weight_grad(table, idx, g):
    s, k = idx.shape
    rows = bag_reduce(table, idx.reshape(-1, 1), None).reshape(s, k, -1)
    return (rows.astype(f32) * g[:, None, :].astype(f32)).sum(-1)

  be = _Backend(bag_reduce, compact_rows, grads_of(dense_grad, weight_grad), weight_grad)  # _compact uses be
  return be


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lookup(name: str, num_rows: int, table, idx, weights):
  return _backend(name).bag_reduce(table, idx, weights)


def _lookup_fwd(name, num_rows, table, idx, weights):
  return _lookup(name, num_rows, table, idx, weights), (None if weights is None else table, idx, weights)


def _lookup_bwd(name, num_rows, res, g):
  table, idx, weights = res
  dtable, dweights = _backend(name).grads(table, idx, weights, g, num_rows)
  return dtable, None, None if weights is None else dweights.astype(weights.dtype)


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


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
  return _compact(_backend(name), idx.reshape(-1, 1), None, g.reshape(-1, g.shape[-1]), table.shape[0])


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


def embedding_bag_compact_vjp(table: Float[Array, "V D"], ids: Int[Array, "... k"], weights: Float[Array, "... k"],
                              g: Float[Array, "... D"], *, implementation: str = "auto",
                              mode: str = "fill") -> tuple[CompactGrad, Float[Array, "... k"]]:
  """Gradients of ``embedding_bag`` for cotangent ``g``: the table's as a :class:`CompactGrad`
  (``N = ids.size``) and the weights' (dense)."""
  idx, name = _prepare(table, ids, implementation, mode)
  k, be = ids.shape[-1], _backend(name)
  idx, w, g2 = idx.reshape(-1, k), weights.reshape(-1, k), g.reshape(-1, g.shape[-1])
  dw = be.weight_grad(table, idx, g2).astype(weights.dtype).reshape(weights.shape)
  return _compact(be, idx, w, g2, table.shape[0]), dw
