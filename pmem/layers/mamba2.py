"""Mamba2's SSD mixer (Dao & Gu 2024) on the shared recurrence: per head ``h``,
``S_t = exp(dt_t A_h) S_{t−1} + B_t (dt_t x_t)ᵀ``, ``y_t = S_tᵀ C_t + D_h x_t`` (state ``N × P``),
with ``x, B, C`` from one input projection through a short causal conv + SiLU, ``dt =
softplus(x W_dt + dt_bias)``, ``A = −exp(A_log)`` and the gated RMSNorm ``norm(y ⊙ SiLU(z))``
before the output projection. One group: ``B, C`` are shared by the heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.rules import constrain
from pmem.layers.deltanet import dt_bias_init
from pmem.layers.init import fan_in_normal
from pmem.layers.conv import ShortConv
from pmem.layers.linear_recurrence import recur
from kernels.common import accumulator, widen


@SEQUENCE_MIXERS.register("mamba2")
class Mamba2(nnx.Module):
  """``expand · d_model`` inner channels in heads of ``head_dim``; ``d_state`` = N."""

  def __init__(self, d_model: int, d_state: int = 16, head_dim: int = 16, expand: int = 2, conv: int = 4,
               chunk: int = 64, out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    inner = expand * d_model
    if inner % head_dim:
      raise ValueError(f"expand * d_model = {inner} must be a multiple of head_dim={head_dim}")
    self.d_model, self.d_state, self.head_dim, self.inner = d_model, d_state, head_dim, inner
    self.n_heads, self.chunk, self.dtype = inner // head_dim, chunk, jnp.dtype(dtype)
    p, h = rngs.params, inner // head_dim
    self.w_in = nnx.Param(fan_in_normal(p(), (d_model, 2 * inner + 2 * d_state + h), d_model), axes=("embed", None))
    self.conv = ShortConv(inner + 2 * d_state, conv, rngs=rngs)
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(p(), (h,), minval=1.0, maxval=16.0)), axes=(None,))
    self.dt_bias = nnx.Param(dt_bias_init(p(), h), axes=(None,))
    self.D = nnx.Param(jnp.ones((h,)), axes=(None,))
    self.norm = nnx.Param(jnp.ones((inner,)), axes=(None,))
    self.w_out = nnx.Param(fan_in_normal(p(), (inner, d_model), inner, out_scale), axes=(None, "embed"))

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    del max_len
    return {"S": jnp.zeros((batch, self.n_heads, self.d_state, self.head_dim), accumulator(dtype)),
            "conv": jnp.zeros((batch, self.conv.width - 1, self.conv.channels), dtype)}

  def __call__(self, x, ctx, state: dict | None = None):
    dt_, (b, t, d) = self.dtype, x.shape
    h, n, p, inner = self.n_heads, self.d_state, self.head_dim, self.inner
    zxbcdt = (x.astype(dt_).reshape(b * t, d) @ self.w_in[...].astype(dt_)).reshape(b, t, -1)
    z, xbc, dt = jnp.split(zxbcdt, [inner, 2 * inner + 2 * n], axis=-1)
    xbc, tail = self.conv(xbc, ctx.positions, None if state is None else state["conv"])
    xs, B, C = jnp.split(jax.nn.silu(xbc), [inner, inner + n], axis=-1)
    dt = jax.nn.softplus(widen(dt) + self.dt_bias[...])  # [B, T, H]
    xs = widen(xs.reshape(b, t, h, p))
    heads = lambda u: jnp.broadcast_to(widen(u[:, :, None]), (b, t, h, n))  # noqa: E731
    y, S = recur(heads(C), heads(B), xs * dt[..., None], dt * -jnp.exp(self.A_log[...]), None, ctx,
                 None if state is None else state["S"], self.chunk)
    y = (y + self.D[...][:, None] * xs).reshape(b, t, inner) * jax.nn.silu(widen(z))
    y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * self.norm[...]
    out = constrain((y.astype(dt_).reshape(b * t, inner) @ self.w_out[...].astype(dt_)).reshape(b, t, d),
                    ("batch", "length", "embed"))
    if state is None:
      return out
    return out, {"S": S, "conv": tail.astype(state["conv"].dtype)}

  def cost(self, seq_len: int) -> accounting.Cost:
    """Projections, conv, and per token per head the chunked form's state read / write (2·N·P each)
    and intra-chunk scores and values (C/2 keys on average, N + P)."""
    h, n, p = self.n_heads, self.d_state, self.head_dim
    c = accounting.dense(self.d_model, self.w_in.shape[1]) + accounting.dense(self.inner, self.d_model)
    c = c + self.conv.cost(seq_len) + accounting.vector(3 * h + self.inner)
    keys = min(self.chunk, seq_len) / 2
    return c + accounting.Cost(flops=int(h * (4 * n * p + 2 * keys * (n + p))))
