"""RMSNorm with float32 statistics (HF Llama semantics: normalize in f32, then scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from pmem.core import accounting


class RMSNorm(nnx.Module):

  def __init__(self, d: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None = None):
    del rngs
    self.d, self.eps = d, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("embed",))

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * y).astype(x.dtype)

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.vector(self.d)
