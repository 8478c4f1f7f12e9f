"""XLA reference: ``jnp.take``, ``segment_sum`` into the runs of sorted ids, and a dense scatter-add.

Accumulation is float32. Indices outside [0, rows) contribute nothing (the ops pass ``rows`` as the
"no row" sentinel). Deterministic on CPU and TPU; on GPU XLA's scatter-add uses atomics unless
``--xla_gpu_deterministic_ops=true`` (the GPU kernels reduce each run in one program, in order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def check(d: int, dtype) -> None:
  del d, dtype


def bag_reduce(src, idx, weights):
  """out[s] = sum_j weights[s, j] * src[idx[s, j]]; idx [S, k], weights [S, k] or None."""
  rows = jnp.take(src, idx, axis=0, mode="fill", fill_value=0)
  if weights is None and idx.shape[1] == 1:
    return rows[:, 0]
  w = jnp.ones(idx.shape, f32) if weights is None else weights.astype(f32)
  return (rows.astype(f32) * w[..., None]).sum(1).astype(src.dtype)


def _entries(g, weights):
  """The (weighted) cotangent of each looked-up id, [S*k, D] float32."""
  if weights is None:
    return g.astype(f32)
  return (weights[..., None].astype(f32) * g[:, None, :].astype(f32)).reshape(-1, g.shape[-1])


def compact_rows(g, order, seg, ok, weights):
  """Rows of the compact gradient: each entry's g row is scattered straight into its run. Entries
  arrive in original order, which within a run is the stable sorted order, so on CPU the sums equal
  a sorted segment sum bit for bit, without first gathering g into sorted order."""
  n = order.shape[0]
  run = jnp.zeros((n,), seg.dtype).at[order].set(jnp.where(ok, seg, n))  # n: out-of-range id, dropped
  return jax.ops.segment_sum(_entries(g, weights), run, n, mode="drop").astype(g.dtype)


def dense_grad(idx, weights, g, num_rows: int):
  """d table of ``bag_reduce`` for cotangent g [S, D]: the scatter-add of the (weighted) g rows."""
  dense = jnp.zeros((num_rows, g.shape[-1]), f32).at[idx.reshape(-1)].add(_entries(g, weights), mode="drop")
  return dense.astype(g.dtype)
