"""XLA reference: three ``lax.top_k`` calls (each half, then the candidate sums)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check(n: int, dtype) -> None:
  del n, dtype


def topk_slots(s1, s2, k: int, a, b):
  """s1, s2 [R, n]; (a, b) the candidate rank pairs -> slots [R, k]."""
  (t1, i1), (t2, i2) = jax.lax.top_k(s1, k), jax.lax.top_k(s2, k)
  best = jax.lax.top_k(t1[:, a] + t2[:, b], k)[1]
  slots = i1[:, a] * s1.shape[-1] + i2[:, b]
  return jnp.take_along_axis(slots, best, -1)


def take(s, i):
  return jnp.take_along_axis(s, i, -1)
