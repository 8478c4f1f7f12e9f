"""Native CPU bags (``kernels/native/kernels.cc`` through the XLA FFI), float32 tables.

Bags (k > 1) run as C++ loops split across XLA's CPU thread pool, over the looked-up ids grouped by
block of 256 KiB of table rows. The forward gives each thread a range of outputs and visits its
entries block by block (the table is swept in order and a block's rows are reused from cache; each
output sums its rows in (block, j) order, within float32 rounding of XLA's j order). The backward
goes block by block (one thread each): the weight gradient's dot product and the weighted cotangent
added into the dense table gradient in the order of XLA's scatter (``xla.dense_grad`` bit for bit);
:func:`table_rows` sums the same products into compact rows instead, and :func:`weight_grad` alone
(a table that is not differentiated) visits the dot products by block too (54 → 38 ms at PKM's
V = 2^16, S = 4096, k = 128). Nothing ``[S, k, D]`` is
formed. Gathers (k = 1, no weights) and their compact gradient are XLA's (``xla.py``): XLA fuses a
gather with its neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import native
from kernels.common import Unavailable
from kernels.embedding import xla
from kernels.embedding.ops import CompactGrad, grads_of, table_rows_of

f32, i32 = jnp.float32, jnp.int32
compact_rows = xla.compact_rows
_xla_grads = grads_of(xla.dense_grad, xla.weight_grad)
_xla_table_rows = table_rows_of(xla.compact_rows)


def check(d: int, dtype) -> None:
  del d
  if jnp.dtype(dtype) != f32:
    raise Unavailable(f"native embedding kernels take float32 tables, got {jnp.dtype(dtype).name}")
  if (reason := native.available()) is not None:
    raise Unavailable(reason)


def _weights(idx, weights):
  return jnp.ones(idx.shape, f32) if weights is None else weights.astype(f32)


def bag_reduce(src, idx, weights):
  """out[s] = sum_j weights[s, j] * src[idx[s, j]]; idx [S, k] (ids >= rows skipped)."""
  if weights is None and idx.shape[1] == 1:
    return xla.bag_reduce(src, idx, None)
  out = jax.ShapeDtypeStruct((idx.shape[0], src.shape[1]), f32)
  return native.call("pmem_bag_fwd", out, src, idx.astype(i32), _weights(idx, weights))


def weight_grad(src, idx, g):
  """<g[s], src[idx[s, j]]>, float32 [S, k]."""
  return native.call("pmem_bag_wgrad", jax.ShapeDtypeStruct(idx.shape, f32), src, idx.astype(i32), g.astype(f32))


def grads(table, idx, weights, g, num_rows: int):
  """(dense table gradient, weight gradient or None): gathers XLA's; bags one native pass over blocks of
  table rows that also forms the weight gradient."""
  if idx.shape[1] == 1:
    return _xla_grads(table, idx, weights, g, num_rows)
  out = (jax.ShapeDtypeStruct((num_rows, g.shape[1]), f32), jax.ShapeDtypeStruct(idx.shape, f32))
  dtable, dw = native.call("pmem_bag_grads", out, table, idx.astype(i32), _weights(idx, weights), g.astype(f32))
  return dtable, None if weights is None else dw


def table_rows(idx, weights, g, num_rows: int) -> CompactGrad:
  """The bag's table gradient as compact rows, min(S k, V) slots: one native pass over blocks of table rows
  (each id's w * g summed in (s, j) order, as XLA's segment sum); gathers XLA's."""
  if idx.shape[1] == 1:
    return _xla_table_rows(idx, weights, g, num_rows)
  m = min(idx.size, num_rows)
  out = (jax.ShapeDtypeStruct((m,), i32), jax.ShapeDtypeStruct((m, g.shape[1]), f32), jax.ShapeDtypeStruct((), i32))
  ids, rows, count = native.call("pmem_bag_rows", out, idx.astype(i32), _weights(idx, weights), g.astype(f32),
                                 num_rows=np.int64(num_rows))
  return CompactGrad(ids, rows, count)
