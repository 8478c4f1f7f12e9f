"""RMSNorm with float32 statistics (HF Llama semantics: normalize in f32, then scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from kernels import fused_add_rmsnorm
from kernels.common import check_name
from pmem.core import accounting
from kernels.common import widen


class RMSNorm(nnx.Module):
  """``implementation`` picks the kernel of :meth:`add_and_norm` (``kernels.IMPLEMENTATIONS``)."""

  def __init__(self, d: int, eps: float = 1e-6, *, implementation: str = "xla", rngs: nnx.Rngs | None = None):
    del rngs
    check_name(implementation)
    self.d, self.eps, self.implementation = d, eps, implementation
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("embed",))

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x32 = widen(x)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * y).astype(x.dtype)

  def add_and_norm(self, x: Float[Array, "... D"], residual: Float[Array, "... D"]
                   ) -> tuple[Float[Array, "... D"], Float[Array, "... D"]]:
    """``(self(x + residual), x + residual)`` in one fused op (``kernels.fused_add_rmsnorm``)."""
    return fused_add_rmsnorm(x, residual, self.scale[...], self.eps, implementation=self.implementation)

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.vector(self.d)
