"""Linear attention (Katharopoulos et al. 2020) and gated linear attention (GLA, Yang et al. 2024)
as :class:`pmem.layers.linear_recurrence.LinearRecurrence` mixers: ``S_t = diag(g_t) S_{t−1} + k_t v_tᵀ``,
``o_t = S_tᵀ q_t``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.init import fan_in_normal
from pmem.layers.linear_recurrence import LinearRecurrence
from kernels.common import widen

FEATURE_MAPS = {"identity": lambda x: x, "elu": lambda x: jax.nn.elu(x) + 1.0, "relu": jax.nn.relu}


@SEQUENCE_MIXERS.register("linear_attn")
class LinearAttention(LinearRecurrence):
  """No decay (``g = 1``); ``feature_map`` φ applied to q and k (``FEATURE_MAPS``)."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, feature_map: str = "elu",
               chunk: int = 64, out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"unknown feature_map {feature_map!r} (known: {', '.join(FEATURE_MAPS)})")
    self.feature_map = feature_map
    super().__init__(d_model, n_heads, head_dim, chunk=chunk, out_scale=out_scale, dtype=dtype, rngs=rngs)

  def features(self, q, k):
    phi = FEATURE_MAPS[self.feature_map]
    return phi(q), phi(k)


@SEQUENCE_MIXERS.register("gla")
class GLA(LinearRecurrence):
  """Per-key-dim decay ``a = log σ(x W_1 W_2 + b) / τ`` (a rank-``gate_rank`` projection,
  ``τ = 16``: GLA eq. / fla's ``gate_logit_normalizer``), SiLU output gate; keys ``head_dim``
  (default ``d_model / (2 H)``: GLA's ``expand_k = 0.5``), values ``d_model / H``."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, gate_rank: int = 16,
               normalizer: float = 16.0, chunk: int = 16, out_scale: float = 1.0, dtype: str = "float32",
               *, rngs: nnx.Rngs):
    kd = head_dim or max(1, d_model // (2 * n_heads))
    super().__init__(d_model, n_heads, kd, gate=True, chunk=chunk, out_scale=out_scale, dtype=dtype, rngs=rngs)
    p = rngs.params
    self.normalizer = normalizer
    self.w_a1 = nnx.Param(fan_in_normal(p(), (d_model, gate_rank), d_model), axes=("embed", None))
    self.w_a2 = nnx.Param(fan_in_normal(p(), (gate_rank, n_heads * kd), gate_rank), axes=(None, "heads"))
    self.b_a = nnx.Param(jnp.zeros((n_heads * kd,)), axes=("heads",))

  def decay(self, x2, b, t):
    z = (x2 @ self.w_a1[...].astype(x2.dtype)) @ self.w_a2[...].astype(x2.dtype) + self.b_a[...]
    return (jax.nn.log_sigmoid(widen(z)) / self.normalizer).reshape(b, t, self.n_heads, self.head_dim)

  def cost(self, seq_len: int) -> accounting.Cost:
    r = self.w_a1.shape[1]
    gate = accounting.dense(self.d_model, r) + accounting.dense(r, self.n_heads * self.head_dim)
    return super().cost(seq_len) + gate + accounting.vector(self.n_heads * self.head_dim)
