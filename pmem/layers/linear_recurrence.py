"""The linear-recurrence sequence mixers' shared parts: :func:`recur` (the recurrence over a call:
chunked for whole documents and prompts, one step per decode token; the math is
``pmem/layers/recurrence.py``) and :class:`LinearRecurrence`, the projection / gate / norm layout that
linear attention, GLA, DeltaNet and Gated DeltaNet share (each a short subclass:
``pmem/layers/linear_attention.py``, ``pmem/layers/deltanet.py``), with optional short convs
(``pmem/layers/conv.py``). Decode state (pmem.core.mixer): ``{"S": f32[B, H, K, V], "conv": {name:
[B, W − 1, C]}}``; its size does not grow with ``max_len``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from pmem.core import accounting
from pmem.core.mixer import TokenContext
from pmem.core.rules import constrain
from pmem.layers import recurrence
from pmem.layers.conv import ShortConv
from pmem.layers.init import fan_in_normal
from kernels.common import accumulator, widen


def recur(q, k, v, a, beta, ctx: TokenContext, S, chunk: int):
  """The recurrence over the call's tokens (``[B, T, H, ·]``) → ``(o, S')``: padding
  (``segment_ids == 0``) changes nothing in ``S`` (a conv's tail does hold it: decode prompts are
  left-padded, pmem.decode), documents start from a zero state; one
  :func:`recurrence.step` for a one-token call on a state, else :func:`recurrence.chunked` from
  ``S`` (None: zeros)."""
  valid = (ctx.segment_ids > 0)[:, :, None]
  k = jnp.where(valid[..., None], k, 0.0)
  a = jnp.where(valid[..., None] if a.ndim == 4 else valid, a, 0.0)
  reset = recurrence.doc_starts(ctx.positions) & valid[..., 0]  # padding's position 0 starts nothing
  if S is not None and q.shape[1] == 1:
    S, o = recurrence.step(S, q[:, 0], k[:, 0], v[:, 0], a[:, 0], None if beta is None else beta[:, 0], reset[:, 0])
    o = o[:, None]
  else:
    o, S = recurrence.chunked(q, k, v, a, beta, reset, S0=S, chunk=chunk)
  return constrain(o, ("batch", "length", "act_heads", None)), constrain(S, ("batch", "act_heads", None, None))


def head_rms(o: Float[Array, "B T H V"], scale: jax.Array, eps: float = 1e-6) -> Float[Array, "B T H V"]:
  """RMSNorm over each head's ``V`` values (float32 statistics, float64 for float64)."""
  o32 = widen(o)
  return o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, -1, keepdims=True) + eps) * scale


class LinearRecurrence(nnx.Module):
  """``o = recurrence(φ(q), φ(k), v, a, β)`` per head, then a per-head RMSNorm, an optional SiLU
  output gate and the output projection. Subclasses choose ``φ`` (:meth:`features`), the log decay
  (:meth:`decay`: None, ``[B, T, H]`` or ``[B, T, H, K]``) and the delta rule (``delta``: a
  ``β = σ(x W_β)`` per head); ``conv``: a short conv + SiLU on q, k and v (DeltaNet's). ``q`` is
  scaled by ``K^-1/2``. ``memories`` M > 1 (Mixture-of-Memories, ``pmem/layers/mom.py``): k, v, β and
  the decay are projected (and convolved) per memory, ``[B, T, M·H, ·]`` memory-major, the state holds
  ``M·H`` heads, q is shared and :meth:`mix` combines the memories."""

  delta = False
  memories = 1

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, value_dim: int | None = None,
               conv: int = 0, gate: bool = False, chunk: int = 64, out_scale: float = 1.0,
               dtype: str = "float32", *, rngs: nnx.Rngs):
    if chunk < 1:
      raise ValueError(f"chunk must be >= 1 tokens, got {chunk}")
    kd, vd = head_dim or d_model // n_heads, value_dim or d_model // n_heads
    self.d_model, self.n_heads, self.head_dim, self.value_dim = d_model, n_heads, kd, vd
    self.chunk, self.dtype, self.gate = chunk, jnp.dtype(dtype), gate
    p = rngs.params
    self.wq = nnx.Param(fan_in_normal(p(), (d_model, n_heads * kd), d_model), axes=("embed", "heads"))
    m = self.memories
    self.wk = nnx.Param(fan_in_normal(p(), (d_model, m * n_heads * kd), d_model), axes=("embed", "heads"))
    self.wv = nnx.Param(fan_in_normal(p(), (d_model, m * n_heads * vd), d_model), axes=("embed", "heads"))
    self.wo = nnx.Param(fan_in_normal(p(), (n_heads * vd, d_model), n_heads * vd, out_scale), axes=("heads", "embed"))
    self.norm = nnx.Param(jnp.ones((vd,)), axes=(None,))
    if gate:
      self.wg = nnx.Param(fan_in_normal(p(), (d_model, n_heads * vd), d_model), axes=("embed", "heads"))
    if self.delta:
      self.wb = nnx.Param(fan_in_normal(p(), (d_model, m * n_heads), d_model), axes=("embed", None))
    self.convs = nnx.Dict({n: ShortConv(c, conv, rngs=rngs) for n, c in (("q", n_heads * kd), ("k", m * n_heads * kd),
                                                                        ("v", m * n_heads * vd))} if conv else {})

  def features(self, q, k):
    """``φ(q), φ(k)`` (``[B, T, H, K]``): the identity here."""
    return q, k

  def decay(self, x2: Float[Array, "N D"], b: int, t: int):
    """The log decay ``a <= 0`` (``[B, T, M·H]`` or ``[B, T, H, K]``) or None (no decay)."""
    del x2, b, t
    return None

  def mix(self, x2: Float[Array, "N D"], q, k, v, a, beta, ctx: TokenContext, S):
    """The recurrence over the call (:func:`recur`; ``q`` scaled) → ``(o [B, T, H, V], S')``."""
    del x2
    return recur(q, k, v, a, beta, ctx, S, self.chunk)

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    del max_len
    s = {"S": jnp.zeros((batch, self.memories * self.n_heads, self.head_dim, self.value_dim), accumulator(dtype))}
    s["conv"] = {n: jnp.zeros((batch, c.width - 1, c.channels), dtype) for n, c in self.convs.items()}
    return s

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    dt, (b, t, d) = self.dtype, x.shape
    h, kd, vd = self.n_heads, self.head_dim, self.value_dim
    x2 = x.astype(dt).reshape(b * t, d)
    proj = {n: (x2 @ getattr(self, f"w{n}")[...].astype(dt)).reshape(b, t, -1) for n in ("q", "k", "v")}
    tails = {}
    for n, c in self.convs.items():
      y, tails[n] = c(proj[n], ctx.positions, None if state is None else state["conv"][n])
      proj[n] = jax.nn.silu(y)
    q, k = self.features(proj["q"].reshape(b, t, h, kd), proj["k"].reshape(b, t, -1, kd))
    v = proj["v"].reshape(b, t, -1, vd)
    a = self.decay(x2, b, t)
    a = jnp.zeros((b, t, self.memories * h), accumulator(dt)) if a is None else a
    beta = jax.nn.sigmoid(x2 @ self.wb[...].astype(dt)).reshape(b, t, -1) if self.delta else None
    o, S = self.mix(x2, q * kd ** -0.5, k, v, a, beta, ctx, None if state is None else state["S"])
    o = head_rms(o, self.norm[...])
    if self.gate:
      o = o * jax.nn.silu(x2 @ self.wg[...].astype(dt)).reshape(b, t, h, vd)
    y = o.astype(dt).reshape(b * t, h * vd) @ self.wo[...].astype(dt)
    y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
    if state is None:
      return y
    return y, {"S": S, "conv": {n: tails[n].astype(state["conv"][n].dtype) for n in tails}}

  def cost(self, seq_len: int) -> accounting.Cost:
    """The shared parts (q and its conv, the output gate, norm and projection) and :meth:`memory_cost`."""
    d, h, kd, vd = self.d_model, self.n_heads, self.head_dim, self.value_dim
    c = accounting.dense(d, h * kd) + accounting.dense(h * vd, d) + accounting.vector(vd)
    c = c + (accounting.dense(d, h * vd) if self.gate else accounting.Cost())
    c = c + (self.convs["q"].cost(seq_len) if self.convs else accounting.Cost())
    return c + self.memory_cost(seq_len)

  def memory_cost(self, seq_len: int) -> accounting.Cost:
    """The M memories' part, M times one memory's (every field): the k, v (and β) projections, their convs,
    and per token the chunked form's matmuls: the state read and write (2·K·V each per head) and the
    intra-chunk scores and values (C/2 keys on average, K + V)."""
    d, h, kd, vd, m = self.d_model, self.n_heads, self.head_dim, self.value_dim, self.memories
    c = accounting.dense(d, m * h * kd) + accounting.dense(d, m * h * vd)
    c = c + (accounting.dense(d, m * h) if self.delta else accounting.Cost())
    c = sum((self.convs[n].cost(seq_len) for n in ("k", "v") if n in self.convs), c)
    keys = min(self.chunk, seq_len) / 2
    per_head = 2 * (2 * kd * vd) + 2 * keys * (kd + vd) + (2 * 2 * kd * vd if self.delta else 0)
    return c + accounting.Cost(flops=m * int(h * per_head))
