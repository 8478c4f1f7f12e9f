"""GQA causal self-attention with RoPE that never attends across packed documents, optionally
within a sliding window of ``window`` positions, with a KV cache for prefill and decode.

The cache (:meth:`Attention.init_state`) holds the roped keys and the values of up to ``S`` tokens
per row, ``S = max_len`` (or ``window``: a ring buffer), with each slot's position and segment id
(segment 0: empty or padding): ``{k, v: [B, S, K, H], pos, seg: int32 [B, S], end: int32 []}``
(``end``: tokens written so far, the same for every row; slot of token ``i`` is ``i % S``). A call
on ``T`` new tokens writes them into their slots and attends over the cache, masked by segment,
position (causal) and window; in a ring a chunk of ``T > 1`` could overwrite slots its earlier
tokens see, so it attends over the old slots and the chunk, then writes its last ``min(T, S)``.
Without ``window`` the caller keeps ``end + T <= max_len`` (the generator checks it).

``qkv_bias`` adds biases to the q, k and v projections (Qwen2; zero at init), none to the output.
``persistent``: that many learned key / value pairs (Titans' persistent memory, arXiv 2501.00663 eq. 19, as
input-independent tokens before every sequence) that every query sees, un-roped, besides its mask's keys.
``adapter``: LoRA / DoRA on the projections it targets (pmem.layers.adapters).
``kernel_impl`` (the model's, ``DecoderConfig.kernel_impl``): the no-cache call (training, a whole forward)
runs ``kernels.attention`` with that implementation where the op has it and it runs this layer (``"native"``,
``"pallas"``, ...; a name the op lacks, or a kernel that refuses the layer's window, length or dtype: ``"xla"``);
prefill and decode over a cache stay on ``jax.nn.dot_product_attention`` (``kernels.attention.xla``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from kernels.attention import IMPLEMENTATIONS as KERNELS, attention
from kernels.attention.xla import dot_product_attention, segment_causal_mask
from kernels.common import Unavailable
from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.rules import constrain
from pmem.layers import adapters
from pmem.layers.init import fan_in_normal
from pmem.layers.rope import apply_rope
from pmem.core.mixer import TokenContext


def cache_mask(q_pos, q_seg, k_pos, k_seg, window: int | None) -> jax.Array:
  """bool[B, 1, T, S]: query (position, segment) sees key slot (position, segment) when both are in
  the same non-padding segment and the key is not later (nor ``window`` or more positions back)."""
  dp = q_pos[:, :, None] - k_pos[:, None, :]
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] > 0) & (dp >= 0)
  if window is not None:
    mask &= dp < window
  return mask[:, None]


@SEQUENCE_MIXERS.register("attention")
class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
               rope_theta: float = 10000.0, window: int | None = None, out_scale: float = 1.0,
               dtype: str = "float32", qkv_bias: bool = False, adapter: adapters.AdapterConfig | None = None,
               kernel_impl: str = "xla", persistent: int = 0, *, rngs: nnx.Rngs):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    if window is not None and window < 1:
      raise ValueError(f"attention window must be >= 1 positions (or None), got {window}")
    h = head_dim or d_model // n_heads
    self.n_heads, self.n_kv_heads, self.head_dim, self.window = n_heads, n_kv_heads, h, window
    self.d_model, self.rope_theta, self.dtype, self.qkv_bias = d_model, rope_theta, jnp.dtype(dtype), qkv_bias
    self.kernel_impl = kernel_impl if kernel_impl in KERNELS else "xla"
    k = rngs.params
    self.wq = nnx.Param(fan_in_normal(k(), (d_model, n_heads, h), d_model), axes=("embed", "heads", "head_dim"))
    self.wk = nnx.Param(fan_in_normal(k(), (d_model, n_kv_heads, h), d_model), axes=("embed", "kv_heads", "head_dim"))
    self.wv = nnx.Param(fan_in_normal(k(), (d_model, n_kv_heads, h), d_model), axes=("embed", "kv_heads", "head_dim"))
    self.wo = nnx.Param(fan_in_normal(k(), (n_heads, h, d_model), n_heads * h, out_scale),
                        axes=("heads", "head_dim", "embed"))
    if qkv_bias:
      self.bq = nnx.Param(jnp.zeros((n_heads, h), jnp.float32), axes=("heads", "head_dim"))
      self.bk = nnx.Param(jnp.zeros((n_kv_heads, h), jnp.float32), axes=("kv_heads", "head_dim"))
      self.bv = nnx.Param(jnp.zeros((n_kv_heads, h), jnp.float32), axes=("kv_heads", "head_dim"))
    self.adapters = adapters.build(adapter, self, tuple(self.AXES), rngs=rngs)
    self.persistent = persistent
    if persistent:
      self.pk, self.pv = (nnx.Param(jax.random.normal(k(), (persistent, n_kv_heads, h)), axes=(None, "kv_heads", "head_dim"))
                          for _ in range(2))

  AXES = {"wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"), "wo": ("heads", "embed")}

  def weight2d(self, name: str) -> jax.Array:
    """Projection ``name`` as ``[..., d_in, d_out]`` (heads x head_dim flattened; leading stacked-layer dims kept)."""
    w = getattr(self, name)[...]
    lead = w.shape[:w.ndim - 3]
    return w.reshape(*lead, self.d_model, -1) if name != "wo" else w.reshape(*lead, -1, self.d_model)

  def weight_axes(self, name: str) -> tuple[str, str]:
    return self.AXES[name]

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict[str, jax.Array]:
    """An empty cache (module docstring) of ``max_len`` slots, or ``window`` if smaller."""
    s = min(max_len, self.window or max_len)
    kv = lambda: jnp.zeros((batch, s, self.n_kv_heads, self.head_dim), dtype)  # noqa: E731
    return {"k": kv(), "v": kv(), "pos": jnp.zeros((batch, s), jnp.int32), "seg": jnp.zeros((batch, s), jnp.int32),
            "end": jnp.zeros((), jnp.int32)}

  def qkv(self, x: Float[Array, "B T D"], ctx: TokenContext):
    """The queries ``[B, T, N, H]`` and keys ``[B, T, K, H]`` roped at ``ctx.positions``, and the values (after
    :meth:`mix_values`), of ``x``."""
    dt, (b, t, d) = self.dtype, x.shape
    n, nkv, h = self.n_heads, self.n_kv_heads, self.head_dim
    x2 = x.astype(dt).reshape(b * t, d)  # 2-D matmuls (faster than 3-D einsums on XLA:CPU)
    q = adapters.project(self, "wq", x2, ctx.rng).reshape(b, t, n, h)
    k = adapters.project(self, "wk", x2, ctx.rng).reshape(b, t, nkv, h)
    v = adapters.project(self, "wv", x2, ctx.rng).reshape(b, t, nkv, h)
    if self.qkv_bias:
      q, k, v = (y + bias[...].astype(dt) for y, bias in ((q, self.bq), (k, self.bk), (v, self.bv)))
    v = self.mix_values(v, x.astype(dt), ctx)
    q = constrain(apply_rope(q, ctx.positions, self.rope_theta), ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, ctx.positions, self.rope_theta), ("batch", "length", "act_kv_heads", None))
    return q, k, constrain(v, ("batch", "length", "act_kv_heads", None))

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    """``y`` (whole documents) or, with a cache ``state``, ``(y, new_state)`` (pmem.core.mixer)."""
    (b, t, d), n, h, dt = x.shape, self.n_heads, self.head_dim, self.dtype
    q, k, v = self.qkv(x, ctx)
    if state is None and self.persistent:
      o = self._attend(q, k, v, segment_causal_mask(ctx.segment_ids, ctx.positions, self.window))
    elif state is None:
      try:
        o = attention(q, k, v, ctx.segment_ids, ctx.positions, self.window, implementation=self.kernel_impl)
      except Unavailable:  # the named kernel refuses this layer (module docstring)
        o = attention(q, k, v, ctx.segment_ids, ctx.positions, self.window, implementation="xla")
    elif t == 1 or self.window is None:  # the new tokens overwrite no slot they could see: write, then read
      state = self._write(state, k, v, ctx)
      mask = cache_mask(ctx.positions, ctx.segment_ids, state["pos"], state["seg"], self.window)
      o = self._attend(q, state["k"].astype(dt), state["v"].astype(dt), mask)
    else:  # a chunk longer than one token into a ring: attend over the old slots and the chunk
      c = state
      keys = jnp.concatenate([c["k"], k.astype(c["k"].dtype)], 1).astype(dt)
      vals = jnp.concatenate([c["v"], v.astype(c["v"].dtype)], 1).astype(dt)
      mask = cache_mask(ctx.positions, ctx.segment_ids, jnp.concatenate([c["pos"], ctx.positions], 1),
                        jnp.concatenate([c["seg"], ctx.segment_ids], 1), self.window)
      o = self._attend(q, keys, vals, mask)
      state = self._write(c, k, v, ctx)
    o = constrain(o, ("batch", "length", "act_heads", None))
    y = adapters.project(self, "wo", o.reshape(b * t, n * h), ctx.rng)
    y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
    return y if state is None else (y, state)

  def _attend(self, q, k, v, mask):
    """:func:`dot_product_attention` over the persistent pairs (every query sees them) and ``k, v`` under ``mask``."""
    if self.persistent:
      b, t, n = q.shape[0], q.shape[1], self.persistent
      lead = lambda p: jnp.broadcast_to(p[...].astype(k.dtype), (b, *p.shape))  # noqa: E731
      k, v = jnp.concatenate([lead(self.pk), k], 1), jnp.concatenate([lead(self.pv), v], 1)
      mask = jnp.concatenate([jnp.ones((b, 1, t, n), bool), mask], -1)
    return dot_product_attention(q, k, v, mask)

  @staticmethod
  def _write(c: dict, k: jax.Array, v: jax.Array, ctx: TokenContext) -> dict:
    """The cache with the last ``min(T, S)`` new tokens written at slots ``i % S``."""
    s, t = c["k"].shape[1], k.shape[1]
    m = min(t, s)
    slots = (c["end"] + t - m + jnp.arange(m)) % s
    put = lambda old, new: old.at[:, slots].set(new[:, t - m:].astype(old.dtype))  # noqa: E731
    kv_axes = ("batch", "length", "act_kv_heads", None)
    return {"k": constrain(put(c["k"], k), kv_axes), "v": constrain(put(c["v"], v), kv_axes),
            "pos": put(c["pos"], ctx.positions), "seg": put(c["seg"], ctx.segment_ids), "end": c["end"] + t}

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
    if self.qkv_bias:
      proj = proj + accounting.vector((n + 2 * nkv) * h)
    proj = proj + adapters.cost(self)
    # QK^T and AV: 2 matmuls x 2 FLOPs x keys per query x n*h; keys: T/2 (causal), or the mean of
    # min(t + 1, window) over the sequence
    w = self.window
    keys2 = seq_len if w is None or w >= seq_len else (w * (w + 1) + 2 * w * (seq_len - w)) // seq_len
    persistent = accounting.vector(2 * self.persistent * nkv * h) + accounting.Cost(flops=4 * self.persistent * n * h)
    return proj + persistent + accounting.Cost(flops=2 * keys2 * n * h)
