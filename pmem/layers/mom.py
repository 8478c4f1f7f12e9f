"""Mixture-of-Memories (MoM; Du, Sun, Lan, Hu, Cheng 2025, arXiv 2502.13685) as a
:class:`pmem.layers.deltanet.GatedDeltaNet` with ``M = E (+1 shared)`` memories (fla's ``MomAttention``,
gated-deltanet backend):

  p_t = softmax(x_t W_r) ∈ R^E,   w_t = top-k of p_t renormalised (Σ_m w_tm = 1, zero off the top-k)
  S^m_t = g^m_t (I − β^m_t k^m_t k^mᵀ_t) S^m_{t−1} + β^m_t k^m_t v^mᵀ_t     for m routed t, else S^m_{t−1}
  o_t = Σ_{m∈topk} w_tm S^mᵀ_t q_t (+ S^sᵀ_t q_t, the shared memory, always on, unweighted)

with each memory's own k, v, β and decay projections (``a = −exp(A_log)·softplus(x W_α^m + dt_bias)``,
``A_log`` and ``dt_bias`` shared as in fla), the query shared, q and k L2-normalised after a short conv +
SiLU, then GatedDeltaNet's per-head RMSNorm, SiLU output gate and output projection. The read-out is
linear in S, so ``o_t = (Σ_m w_tm S^m_t)ᵀ q_t``: the paper's mixed memory.

A memory is left unchanged by a token not routed to it: it gets ``k = 0, β = 0, a = 0`` there, which in
the recurrence core (:func:`pmem.layers.linear_recurrence.recur`, the memories folded into the head axis,
memory-major) leaves its state bit for bit (``S·exp(0) + 0``), so its recurrence is that of its routed
sub-sequence (fla gathers each memory's tokens instead; equal in exact arithmetic, and bit for bit one
token at a time). Every memory is computed at every token (the masked form: static shapes, no sort).

**The short convs run on the full token stream**, each memory's k and v conv over all tokens (weights
per memory, like its projections), the shared q's once. fla's ``MomAttention`` convolves each memory's
gathered sub-sequence, and in training over the concatenation of all of them (``conv_cu_seqlens=None``),
so its first taps cross into the previous memory's or row's tokens and training differs from inference.
On the full stream the conv stays what it is in GatedDeltaNet, a local filter over the previous W − 1
tokens of the document (never across a document start), the same in training and decode, with a
decode tail of constant size; and q stays one vector per token, so the mixed-memory identity holds.

Balance loss (Switch Transformer; fla's ``load_balancing_loss_func``): ``E · Σ_m f_m P_m`` over the call's
non-padding tokens, ``f_m`` the fraction of them routed to m (fla's per-slot fractions summed over the k
slots, so Σ_m f_m = k and uniform routing gives k) and ``P_m`` their mean router probability; times
``balance`` it is added per layer as the auxiliary loss ``mom_balance`` (pmem.core.auxiliary; the logged
value is the sum over the layers). fla pools all layers' tokens into one such term.

Decode state: ``{"S": [B, M·H, K, V]`` (memory-major, the shared memory last), ``"conv": tails}``,
constant in ``max_len``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from pmem.core import accounting, auxiliary
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.deltanet import GatedDeltaNet
from pmem.layers.init import fan_in_normal
from pmem.layers.linear_recurrence import recur
from kernels.common import widen


@SEQUENCE_MIXERS.register("mom")
class MoM(GatedDeltaNet):
  """``n_memories`` E routed memories, ``topk`` per token, ``shared``: one more memory that every token
  updates; ``balance``: the weight of the balance loss (0: none)."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, n_memories: int = 4, topk: int = 2,
               shared: bool = True, conv: int = 4, chunk: int = 64, balance: float = 0.01, out_scale: float = 1.0,
               dtype: str = "float32", *, rngs: nnx.Rngs):
    if not 1 <= topk <= n_memories:
      raise ValueError(f"topk must be in [1, n_memories={n_memories}], got {topk}")
    self.n_memories, self.topk, self.shared, self.balance = n_memories, topk, shared, balance
    self.memories = n_memories + shared
    super().__init__(d_model, n_heads, head_dim, conv, chunk, out_scale, dtype, rngs=rngs)
    self.w_r = nnx.Param(fan_in_normal(rngs.params(), (d_model, n_memories), d_model), axes=("embed", None))

  def route(self, x2: Float[Array, "N D"], b: int, t: int
            ) -> tuple[Float[Array, "B T E"], Float[Array, "B T E"], Bool[Array, "B T E"]]:
    """``(p, w, routed)``: the router's probabilities, the top-k renormalised (zero elsewhere) and which
    memories each token is routed to."""
    p = jax.nn.softmax(widen(x2 @ self.w_r[...].astype(x2.dtype)), -1).reshape(b, t, -1)
    top, idx = jax.lax.top_k(p, self.topk)
    hot = jax.nn.one_hot(idx, self.n_memories, dtype=p.dtype)  # [B, T, k, E]
    w = ((top / top.sum(-1, keepdims=True))[..., None] * hot).sum(2)
    return p, w, hot.sum(2) > 0

  def mix(self, x2, q, k, v, a, beta, ctx, S):
    b, t, h = *ctx.positions.shape, self.n_heads
    p, w, routed = self.route(x2, b, t)
    if self.balance and auxiliary.active():
      auxiliary.add("mom_balance", self.balance * balance_loss(p, routed, ctx.segment_ids > 0))
    if self.shared:  # always routed, weight 1
      w = jnp.concatenate([w, jnp.ones((b, t, 1), w.dtype)], -1)
      routed = jnp.concatenate([routed, jnp.ones((b, t, 1), bool)], -1)
    on = jnp.repeat(routed, h, axis=-1)  # [B, T, M·H]: an unrouted memory's k, β, a are 0 (its state unchanged)
    k, beta, a = jnp.where(on[..., None], k, 0.0), jnp.where(on, beta, 0.0), jnp.where(on, a, 0.0)
    o, S = recur(jnp.tile(q, (1, 1, self.memories, 1)), k, v, a, beta, ctx, S, self.chunk)
    return (o.reshape(b, t, self.memories, h, -1) * w[..., None, None]).sum(2), S  # o_t = Σ_m w_tm o^m_t

  def cost(self, seq_len: int) -> accounting.Cost:
    """Every memory's parameters; active per token: the shared parts, the router and k of the E memories'
    projections, convs and updates (+ the shared memory's). The masked form here computes all E memories
    at every token (:meth:`memory_cost`); fla's gathered form computes the k counted."""
    full, part = super().cost(seq_len), self.memory_cost(seq_len)
    idle = self.n_memories - self.topk
    active = {f: getattr(full, f) - idle * getattr(part, f) // self.memories
              for f in ("active_params", "flops", "bytes_read")}
    return dataclasses.replace(full, **active) + accounting.dense(self.d_model, self.n_memories)


def balance_loss(p: Float[Array, "B T E"], routed: Bool[Array, "B T E"], valid: Bool[Array, "B T"]) -> Float[Array, ""]:
  """``E · Σ_m f_m P_m`` over the ``valid`` tokens (module docstring)."""
  n = jnp.maximum(valid.sum(), 1)
  f = jnp.where(valid[..., None], routed, False).astype(p.dtype).sum((0, 1)) / n
  P = jnp.where(valid[..., None], p, 0.0).sum((0, 1)) / n
  return p.shape[-1] * jnp.sum(f * P)
