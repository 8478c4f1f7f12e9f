"""GQA causal self-attention with RoPE that never attends across packed documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.rules import constrain
from pmem.layers.init import fan_in_normal
from pmem.layers.rope import apply_rope
from pmem.core.mixer import TokenContext


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
  """bool[B, 1, T, T]: query t sees key s <= t of the same non-padding segment."""
  t = segment_ids.shape[-1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  return (same & causal & (segment_ids[:, :, None] > 0))[:, None]


@SEQUENCE_MIXERS.register("attention")
class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
               rope_theta: float = 10000.0, out_scale: float = 1.0, dtype: str = "float32", *,
               rngs: nnx.Rngs):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    h = head_dim or d_model // n_heads
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, h
    self.d_model, self.rope_theta, self.dtype = d_model, rope_theta, jnp.dtype(dtype)
    k = rngs.params
    self.wq = nnx.Param(fan_in_normal(k(), (d_model, n_heads, h), d_model), axes=("embed", "heads", "head_dim"))
    self.wk = nnx.Param(fan_in_normal(k(), (d_model, n_kv_heads, h), d_model), axes=("embed", "kv_heads", "head_dim"))
    self.wv = nnx.Param(fan_in_normal(k(), (d_model, n_kv_heads, h), d_model), axes=("embed", "kv_heads", "head_dim"))
    self.wo = nnx.Param(fan_in_normal(k(), (n_heads, h, d_model), n_heads * h, out_scale),
                        axes=("heads", "head_dim", "embed"))

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T D"]:
    dt, (b, t, d) = self.dtype, x.shape
    n, nkv, h = self.n_heads, self.n_kv_heads, self.head_dim
    x2 = x.astype(dt).reshape(b * t, d)  # 2-D matmuls (faster than 3-D einsums on XLA:CPU)
    q = (x2 @ self.wq[...].astype(dt).reshape(d, n * h)).reshape(b, t, n, h)
    k = (x2 @ self.wk[...].astype(dt).reshape(d, nkv * h)).reshape(b, t, nkv, h)
    v = (x2 @ self.wv[...].astype(dt).reshape(d, nkv * h)).reshape(b, t, nkv, h)
    v = self.mix_values(v, x.astype(dt), ctx)
    q = constrain(apply_rope(q, ctx.positions, self.rope_theta), ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, ctx.positions, self.rope_theta), ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    o = jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(ctx.segment_ids))
    o = constrain(o, ("batch", "length", "act_heads", None))
    y = o.reshape(b * t, n * h) @ self.wo[...].astype(dt).reshape(n * h, d)
    return constrain(y.reshape(b, t, d), ("batch", "length", "embed"))

  def mix_values(self, v: Float[Array, "B T K H"], x: Float[Array, "B T D"],
                 ctx: TokenContext) -> Float[Array, "B T K H"]:
    """The values attention sees, from the value projection ``v`` (K = n_kv_heads) and the normed
    input ``x``: the identity here; value-embedding mixers (``pmem.memory.move``: MoVE, LaVE)
    override it."""
    del x, ctx
    return v

  def cost(self, seq_len: int) -> accounting.Cost:
    d, h, n, nkv = self.d_model, self.head_dim, self.n_heads, self.n_kv_heads
    proj = accounting.dense(d, n * h) + 2 * accounting.dense(d, nkv * h) + accounting.dense(n * h, d)
    # QK^T and AV: 2 matmuls x 2 FLOPs x T keys x n*h, halved for causal masking.
    return proj + accounting.Cost(flops=2 * 2 * seq_len * n * h // 2)
