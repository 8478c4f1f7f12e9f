"""DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025) as
:class:`pmem.layers.linear_recurrence.LinearRecurrence` mixers: ``S_t = g_t (I − β_t k_t k_tᵀ) S_{t−1} +
β_t k_t v_tᵀ`` with L2-normalised ``q, k`` after a short conv + SiLU, ``β = σ(x W_β)``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.init import fan_in_normal
from pmem.layers.linear_recurrence import LinearRecurrence
from kernels.common import widen


def _l2(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + eps)


@SEQUENCE_MIXERS.register("deltanet")
class DeltaNet(LinearRecurrence):
  """No decay; per-head output RMSNorm."""

  delta = True

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, conv: int = 4, chunk: int = 64,
               out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs, gate: bool = False):
    super().__init__(d_model, n_heads, head_dim, conv=conv, gate=gate, chunk=chunk, out_scale=out_scale,
                     dtype=dtype, rngs=rngs)

  def features(self, q, k):
    return _l2(widen(q)), _l2(widen(k))


@SEQUENCE_MIXERS.register("gdn")
class GatedDeltaNet(DeltaNet):
  """Scalar decay per head ``a = −exp(A_log) · softplus(x W_α + dt_bias)`` (Mamba2's
  parameterisation: ``A ∈ [1, 16]``, ``dt ∈ [1e-3, 0.1]`` at init), SiLU output gate."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, conv: int = 4, chunk: int = 64,
               out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    super().__init__(d_model, n_heads, head_dim, conv, chunk, out_scale, dtype, rngs=rngs, gate=True)
    p = rngs.params
    self.w_alpha = nnx.Param(fan_in_normal(p(), (d_model, self.memories * n_heads), d_model), axes=("embed", None))
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(p(), (n_heads,), minval=1.0, maxval=16.0)), axes=(None,))
    self.dt_bias = nnx.Param(dt_bias_init(p(), n_heads), axes=(None,))

  def decay(self, x2, b, t):  # [B, T, M·H]: A_log and dt_bias shared by the memories (fla's MoM)
    z = widen(x2 @ self.w_alpha[...].astype(x2.dtype)).reshape(b, t, -1, self.n_heads) + self.dt_bias[...]
    return (-jnp.exp(self.A_log[...]) * jax.nn.softplus(z)).reshape(b, t, -1)

  def cost(self, seq_len: int) -> accounting.Cost:
    return super().cost(seq_len) + accounting.vector(2 * self.n_heads)

  def memory_cost(self, seq_len: int) -> accounting.Cost:
    return super().memory_cost(seq_len) + accounting.dense(self.d_model, self.memories * self.n_heads)


def dt_bias_init(key, n: int, lo: float = 1e-3, hi: float = 0.1):
  """``softplus⁻¹(dt)`` for ``dt`` log-uniform in ``[lo, hi]`` (Mamba2's init)."""
  dt = jnp.exp(jax.random.uniform(key, (n,), minval=math.log(lo), maxval=math.log(hi)))
  return dt + jnp.log(-jnp.expm1(-dt))
