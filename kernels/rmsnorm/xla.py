"""XLA reference for fused residual-add + RMSNorm (HF Llama semantics, float32 statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def check(d: int, dtype) -> None:
  del d, dtype


def forward(x, r, scale, eps: float):
  """(normed, y = x + r, rstd[N]) for x, r [N, D]; ``normed = (scale * y * rstd).astype(x.dtype)``."""
  y = x + r
  y32 = y.astype(f32)
  rstd = jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + eps)
  return (scale.astype(f32) * (y32 * rstd)).astype(x.dtype), y, rstd[:, 0]


def backward(g, gy, y, scale, rstd):
  """(dx = dresidual, dscale) from the cotangents of normed (g) and of y (gy)."""
  y32, g32, rstd = y.astype(f32), g.astype(f32), rstd[:, None]
  u = g32 * scale.astype(f32)
  dx = rstd * (u - y32 * (rstd * rstd) * jnp.mean(u * y32, axis=-1, keepdims=True)) + gy.astype(f32)
  return dx.astype(y.dtype), jnp.sum(g32 * (y32 * rstd), axis=0)
