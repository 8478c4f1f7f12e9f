"""Native CPU bags (``kernels/native/kernels.cc`` through the XLA FFI), float32 tables.

Bags (k > 1) run as C++ loops over rows split across XLA's CPU thread pool: the forward weights and
sums each output's rows in place; the backward groups the looked-up ids by block of 256 KiB of table
rows and, block by block (one thread each), takes the weight gradient's dot product and adds the
weighted cotangent into the dense table gradient in the order of XLA's scatter (equal to
``xla.dense_grad`` bit for bit). Nothing ``[S, k, D]`` is formed. Gathers (k = 1, no weights) and the
compact gradient are XLA's (``xla.py``): XLA fuses a gather with its neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import native
from kernels.common import Unavailable
from kernels.embedding import xla
from kernels.embedding.ops import grads_of

f32, i32 = jnp.float32, jnp.int32
compact_rows = xla.compact_rows
_xla_grads = grads_of(xla.dense_grad, xla.weight_grad)


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
