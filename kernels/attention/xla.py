"""XLA reference: ``jax.nn.dot_product_attention`` with the segment / causal / window mask (what
``pmem.layers.attention`` ran before the op), differentiated by autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import accumulator


def check(dtype, shape, window) -> None:
  del dtype, shape, window


def segment_causal_mask(segment_ids: jax.Array, positions: jax.Array | None = None,
                        window: int | None = None) -> jax.Array:
  """bool[B, 1, T, T]: query t sees key s <= t of the same non-padding segment (and, with
  ``window``, less than ``window`` positions back)."""
  t = segment_ids.shape[-1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  mask = same & causal & (segment_ids[:, :, None] > 0)
  if window is not None:
    mask &= positions[:, :, None] - positions[:, None, :] < window
  return mask[:, None]


def dot_product_attention(q, k, v, mask):
  """``jax.nn.dot_product_attention(q, k, v, mask=mask)``, whose softmax is float32 whatever the inputs; for
  float64 inputs (the tests' float64 references) the same masked softmax (a masked score becomes the dtype's
  min) in float64. q [B, T, N, H], k, v [B, S, K, H], mask bool [B, 1, T, S]."""
  if accumulator(q.dtype) != jnp.float64:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  b, t, n, h = q.shape
  kh = k.shape[2]
  s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kh, n // kh, h), k) * h ** -0.5
  p = jax.nn.softmax(jnp.where(mask[:, :, None], s, jnp.finfo(s.dtype).min), axis=-1)
  return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)


def attention(q, k, v, seg, pos, window):
  """:func:`dot_product_attention` under :func:`segment_causal_mask`, differentiated by autodiff (on XLA:CPU
  about 1.5x faster than the FlashAttention-2 backward written in einsums, at the bench size)."""
  return dot_product_attention(q, k, v, segment_causal_mask(seg, pos, window))
