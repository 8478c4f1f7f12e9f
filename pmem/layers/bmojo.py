"""B'MOJO (Zancato, Seshadri, Dukler, Golatkar, Shen, Bowman, Trager, Achille, Soatto; NeurIPS 2024, arXiv
2407.06324) as a sequence mixer ``bmojo``: sliding-window attention (eidetic memory) that also reads a token from an
SSM (fading memory) and a bounded store of past tokens chosen by an innovation test (long-term eidetic memory).

The official code was not released (the paper: "to be open sourced"; none found), and the paper gives the module in
words and figures (its Fig. 6: fading memory tokens from the SSM aggregated with the recent tokens; tokens hard to
predict from the SSM's state kept and appended to the attention's window). The equations below are the choices
made here. For every token t of a document (s, u: earlier tokens of the same document; ``w`` the window, ``N`` the
store's slots, ``τ`` the threshold):

Fading memory, the SSM: Gated DeltaNet without short convs (:class:`pmem.layers.deltanet.GatedDeltaNet`, its
parameters and its output, the recurrence :func:`pmem.layers.linear_recurrence.recur`), per head

    p_t = g_t S_{t−1}ᵀ k̂_t                          the fading state's prediction of v̂_t
    S_t = g_t S_{t−1} + β_t k̂_t (v̂_t − p_t)ᵀ         (the delta rule; S = 0 before a document's first token)
    f_t = GDN_t(x) ∈ R^D                             the fading-memory token: the read-out S_tᵀ q̂_t, normed, gated, projected

Innovation test (the delta rule's own correction, over all heads):

    r_t = ‖v̂_t − p_t‖ / (‖v̂_t‖ + 1e−6),   σ_t = [r_t > τ]   (padding: σ = 0)

Attention (:class:`pmem.layers.attention.Attention`'s projections and RoPE; ``k^f_t, v^f_t``: its key / value
projections of ``f_t``, roped at t), query t over [fading ‖ store ‖ window]:

    window(t) = {s : 0 <= t − s < w}
    store(t)  = {s : σ_s, t − s >= w, |{u : σ_u, s < u <= t − w}| < N}    the last N selected tokens out of the window
    y_t = W_o softmax over {k^f_t} ∪ {k_s : s ∈ store(t) ∪ window(t)} of (q_t·k / √h) applied to the values

The selection depends on the SSM alone (never on the store), so the store is an attention mask of cumulative counts:
with ``c_s = Σ_{u<=s} σ_u`` over the row (any two tokens of a document differ by the count of its selected tokens
between them) and ``R_t`` the count at ``t − w`` (the largest ``c`` of the tokens out of t's window),
``s ∈ store(t) ⇔ σ_s ∧ t − s >= w ∧ R_t − c_s < N``. Training attends once over ``[f ‖ the row]`` under that mask
(dense ``T × 2T``, as the XLA window path is ``T × T``); a document sees nothing of an earlier one (the SSM restarts
at position 0, the window and the store are masked by segment).

Gradients: ``σ`` thresholds ``r`` under a stop-gradient, so which tokens are stored is not differentiated; the loss
reaches the stored tokens through their keys and values (as attention keys), and the SSM through the fading tokens
``f`` only (its prediction ``p`` serves the test alone).

Decode state: ``{"ring": the last w tokens' k, v [B, w, K, h] and pos, seg, σ, c [B, w]; "store": N slots' k, v,
pos, seg, c; "ssm": {"S": [B, H, K, V], "conv": {}}; "count": c of the row's last token [B]}``, constant in
``max_len`` (the ring: ``min(w, max_len)`` slots). A call on T tokens attends over ``[f ‖ store ‖ ring ‖ call]``
under the same mask; the ring then keeps the last w of ``ring ‖ call`` and the store the N most recently selected
(largest ``c``) of ``store ‖ ring ‖ call`` that leave the ring (FIFO).

Special cases by configuration: ``ssm=False, store=0``: ``Attention(window=w)`` (bit for bit in training;
``window=None``: full attention, the Transformer); ``window=0, store=0``: the SSM alone, ``y_t = W_o W_v f_t`` (the
softmax over one key is its value; Mamba-like: Gated DeltaNet then two linear maps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from kernels.attention.xla import dot_product_attention
from kernels.common import widen
from pmem.core import accounting
from pmem.core.mixer import TokenContext
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.rules import constrain
from pmem.layers import adapters
from pmem.layers.attention import Attention, cache_mask
from pmem.layers.deltanet import GatedDeltaNet
from pmem.layers.linear_recurrence import recur
from pmem.layers.recurrence import doc_starts

KV_AXES = ("batch", "length", "act_kv_heads", None)


@SEQUENCE_MIXERS.register("bmojo")
class BMojo(nnx.Module):
  """``window`` w (None: full attention, 0: none), ``store`` N slots, ``ssm``: the fading memory (and the innovation
  test the store needs), ``threshold`` τ on the normalised innovation (1: the SSM's prediction no better than zero),
  ``chunk``: the SSM's chunk (module docstring)."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
               window: int | None = 8, store: int = 8, ssm: bool = True, threshold: float = 1.0, chunk: int = 64,
               rope_theta: float = 10000.0, out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if window is not None and window < 0:
      raise ValueError(f"bmojo window must be >= 0 positions (or None), got {window}")
    if store < 0:
      raise ValueError(f"bmojo store must be >= 0 slots, got {store}")
    if store and (window is None or not ssm):
      raise ValueError("bmojo's store holds tokens that leave the window, selected by the SSM: "
                       f"it needs a window and ssm=True (got window={window}, ssm={ssm})")
    if window == 0 and not ssm:
      raise ValueError("bmojo with window=0 and ssm=False attends to nothing")
    self.d_model, self.window, self.store, self.threshold, self.dtype = d_model, window, store, threshold, jnp.dtype(dtype)
    self.attn = Attention(d_model, n_heads, n_kv_heads or n_heads, head_dim, rope_theta, window or None,
                          out_scale, dtype, rngs=rngs)
    self.ssm = GatedDeltaNet(d_model, n_heads, head_dim, conv=0, chunk=chunk, dtype=dtype, rngs=rngs) if ssm else None

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    s, (nkv, h) = max_len if self.window is None else min(max_len, self.window), (self.attn.n_kv_heads, self.attn.head_dim)
    slots = lambda n, *fields: {"k": jnp.zeros((batch, n, nkv, h), dtype), "v": jnp.zeros((batch, n, nkv, h), dtype),  # noqa: E731
                                **{f: jnp.zeros((batch, n), jnp.int32) for f in ("pos", "seg", *fields)}}
    state = {"ring": slots(s)}
    if self.store:
      state["ring"] = {**slots(s, "cnt"), "sel": jnp.zeros((batch, s), bool)}
      state["store"], state["count"] = slots(self.store, "cnt"), jnp.zeros((batch,), jnp.int32)
    if self.ssm is not None:
      state["ssm"] = self.ssm.init_state(batch, max_len, dtype)
    return state

  def innovation(self, x: Float[Array, "B T D"], ctx: TokenContext, S) -> Float[Array, "B T"]:
    """``r_t = ‖v̂_t − p_t‖ / (‖v̂_t‖ + ε)`` with the SSM's own k̂, v̂, β, g (GatedDeltaNet's projections and
    :meth:`decay`) and ``p_t = g_t S_{t−1}ᵀ k̂_t``: the state after token t − 1 read (:func:`recur`) with token t's
    decayed key; the call's first token reads the entering state ``S`` (None: zeros), a document's first reads 0."""
    m, dt, (b, t, d) = self.ssm, self.dtype, x.shape
    x2 = x.astype(dt).reshape(b * t, d)
    proj = lambda w: (x2 @ w[...].astype(dt)).reshape(b, t, m.n_heads, -1)  # noqa: E731
    k, v = m.features(*[proj(m.wk)] * 2)[1], proj(m.wv)
    a, beta = m.decay(x2, b, t), jax.nn.sigmoid(x2 @ m.wb[...].astype(dt)).reshape(b, t, -1)
    kg = k * jnp.exp(a)[..., None]  # g_t k̂_t
    after, _ = recur(jnp.concatenate([kg[:, 1:], jnp.zeros_like(kg[:, :1])], 1), k, v, a, beta, ctx, S, m.chunk)
    first = jnp.zeros_like(after[:, :1]) if S is None else jnp.einsum("bhk,bhkv->bhv", kg[:, 0], S)[:, None]
    p = jnp.where(doc_starts(ctx.positions)[..., None, None], 0.0, jnp.concatenate([first, after[:, :-1]], 1))
    e, v = widen(v) - p, widen(v)
    return jnp.sqrt(jnp.sum(e * e, (2, 3))) / (jnp.sqrt(jnp.sum(v * v, (2, 3))) + 1e-6)

  def visible(self, pos: Int[Array, "B T"], seg: Int[Array, "B T"], keys: dict) -> Bool[Array, "B 1 T S"]:
    """Which of ``keys`` (``pos, seg`` and, with a store, ``sel, cnt`` ``[B, S]``) each query sees: its window,
    and its store ``σ_s ∧ t − s >= w ∧ R_t − c_s < N`` (module docstring)."""
    mask = cache_mask(pos, seg, keys["pos"], keys["seg"], self.window)
    if not self.store:
      return mask
    left = cache_mask(pos, seg, keys["pos"], keys["seg"], None)[:, 0] & (pos[:, :, None] - keys["pos"][:, None] >= self.window)
    cnt = keys["cnt"][:, None]
    R = jnp.max(jnp.where(left, cnt, 0), -1, keepdims=True, initial=0)  # c at t − w
    return mask | (left & keys["sel"][:, None] & (R - cnt < self.store))[:, None]

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    """``y`` (whole documents) or, with a ``state``, ``(y, new_state)`` (pmem.core.mixer)."""
    (b, t, d), dt, attn = x.shape, self.dtype, self.attn
    q, k, v = attn.qkv(x, ctx)
    new = {"k": k, "v": v, "pos": ctx.positions, "seg": ctx.segment_ids}
    if self.store:
      r = jax.lax.stop_gradient(self.innovation(x, ctx, None if state is None else state["ssm"]["S"]))
      new["sel"] = (ctx.segment_ids > 0) & (r > self.threshold)
      new["cnt"] = jnp.cumsum(new["sel"], 1, dtype=jnp.int32) + (0 if state is None else state["count"][:, None])
    keys = new
    if state is not None:  # [store ‖ ring ‖ call]
      old = [state["ring"]] if not self.store else [{**state["store"], "sel": state["store"]["seg"] > 0}, state["ring"]]
      keys = {f: jnp.concatenate([o[f].astype(new[f].dtype) for o in old] + [new[f]], 1) for f in new}
    mask, kk, vv = self.visible(ctx.positions, ctx.segment_ids, keys), keys["k"].astype(dt), keys["v"].astype(dt)
    ssm_state = None
    if self.ssm is not None:  # the fading token f_t: seen by query t alone
      f, ssm_state = (self.ssm(x, ctx), None) if state is None else self.ssm(x, ctx, state["ssm"])
      _, kf, vf = attn.qkv(f.astype(dt), ctx)
      own = jnp.eye(t, dtype=bool)[None, None] & (ctx.segment_ids > 0)[:, None, :, None]
      mask, kk, vv = jnp.concatenate([own, mask], -1), jnp.concatenate([kf, kk], 1), jnp.concatenate([vf, vv], 1)
    o = constrain(dot_product_attention(q, kk, vv, mask), ("batch", "length", "act_heads", None))
    y = adapters.project(attn, "wo", o.reshape(b * t, -1), ctx.rng)
    y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
    if state is None:
      return y
    return y, self.update(state, keys, t, ssm_state)

  def update(self, state: dict, keys: dict, t: int, ssm_state) -> dict:
    """The state after a call of ``t`` tokens, ``keys`` its ``[store ‖ ring ‖ call]``: the ring the last
    ``w`` of ``ring ‖ call``, the store the N selected with the largest ``c`` that leave it, the count ``c`` at
    the call's last token."""
    s, n = state["ring"]["pos"].shape[1], self.store
    stream = {f: a[:, n:] for f, a in keys.items()}  # ring ‖ call, oldest first
    ring = {f: a[:, a.shape[1] - s:].astype(state["ring"][f].dtype) for f, a in stream.items()}
    new = {"ring": {f: constrain(a, KV_AXES) if f in ("k", "v") else a for f, a in ring.items()}}
    if ssm_state is not None:
      new["ssm"] = ssm_state
    if n:
      leaves = jnp.arange(s + t) < s + t - self.window  # out of the window of every later token
      ok = jnp.concatenate([state["store"]["seg"] > 0, stream["sel"] & leaves], 1)
      score, idx = jax.lax.top_k(jnp.where(ok, keys["cnt"], -1), n)
      take = lambda a: jnp.take_along_axis(a, idx.reshape(*idx.shape, *[1] * (a.ndim - 2)), 1)  # noqa: E731
      store = {f: take(keys[f]).astype(state["store"][f].dtype) for f in state["store"]}
      store["seg"] = jnp.where(score >= 0, store["seg"], 0)
      new["store"] = {f: constrain(a, KV_AXES) if f in ("k", "v") else a for f, a in store.items()}
      new["count"] = keys["cnt"][:, -1]
    return new

  def cost(self, seq_len: int) -> accounting.Cost:
    """The attention's projections, the fading tokens' key / value projections, the SSM (GatedDeltaNet's cost)
    and its prediction pass (the recurrence once more, with the store), and per token the scores and values of
    the keys it sees: its fading token, the window's and, at most, N store slots."""
    a, nkv = self.attn, self.attn.n_kv_heads
    d, n, h = self.d_model, a.n_heads, a.head_dim
    c = accounting.dense(d, n * h) + 2 * accounting.dense(d, nkv * h) + accounting.dense(n * h, d)
    w = seq_len if self.window is None else self.window
    keys = sum(min(i + 1, w) + min(self.store, max(0, i + 1 - w)) for i in range(seq_len)) / seq_len
    if self.ssm is not None:
      m = self.ssm
      c = c + m.cost(seq_len) + accounting.Cost(flops=2 * 2 * d * nkv * h)
      keys += 1
      if self.store:
        kd, vd, span = m.head_dim, m.value_dim, min(m.chunk, seq_len) / 2
        c = c + accounting.Cost(flops=int(m.n_heads * (2 * 2 * kd * vd + 2 * span * (kd + vd) + 2 * 2 * kd * vd)))
    return c + accounting.Cost(flops=int(4 * keys * n * h))

