"""XLA reference for fused residual-add + RMSNorm (HF Llama semantics, float32 statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import accumulator, widen


def check(d: int, dtype) -> None:
  del d, dtype


def forward(x, r, scale, eps: float):
  """(normed, y = x + r, rstd[N]) for x, r [N, D]; ``normed = (scale * y * rstd).astype(x.dtype)``."""
  y = x + r
  y32 = widen(y)
  rstd = jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + eps)
  return (scale.astype(y32.dtype) * (y32 * rstd)).astype(x.dtype), y, rstd[:, 0]


def backward(g, gy, y, scale, rstd):
  """(dx = dresidual, dscale) from the cotangents of normed (g) and of y (gy)."""
  f = accumulator(y.dtype, g.dtype)
  y32, g32, rstd = y.astype(f), g.astype(f), rstd[:, None]
  u = g32 * scale.astype(f)
  dx = rstd * (u - y32 * (rstd * rstd) * jnp.mean(u * y32, axis=-1, keepdims=True)) + gy.astype(f)
  return dx.astype(y.dtype), jnp.sum(g32 * (y32 * rstd), axis=0)
