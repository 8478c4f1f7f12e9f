"""Rotary position embedding, HF "rotate_half" convention (pairs (i, i + dh/2))."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def apply_rope(x: Float[Array, "B T N H"], positions: Int[Array, "B T"],
               theta: float = 10000.0) -> Float[Array, "B T N H"]:
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(ang) + rot * jnp.sin(ang)).astype(x.dtype)
