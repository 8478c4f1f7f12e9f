"""Titans' neural long-term memory (LMM; Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663 §3) as a sequence
mixer, ``titans``, and memory-as-a-gate, ``titans_mag`` (§4.2). Memory-as-a-layer is the layer pattern
``fiddler:hybrid(pattern='GW', G='titans')`` (configs/titans.py).

Per head, the memory is an MLP ``M_W`` of ``depth`` >= 1 layers (``dk → expand·dk → … → dk``, GELU between,
depth 1: a linear memory), optionally wrapped as ``x + LN(M_W(x))·γ + b`` (``residual_norm``, TTT / fla's form).
Keys, values and queries are projections after a short causal conv + SiLU, with q and k L2-normalised; the gates
are per token, per head and data-dependent: ``θ_t = max_lr·σ(·)``, ``η_t = σ(·)``, ``α_t = σ(·)``. Token by token,
with ``R`` the weights at the start of the token's memory chunk (eq. 13-14 with mini-batch gradients, §3.2):

    g_t = ∇_W ‖M_W(k_t) − v_t‖² at W = R          (associative loss, eq. 12; clipped to ``max_grad_norm``)
    S_t = η_t S_{t−1} − θ_t g_t                    (surprise with momentum, eq. 10)
    W_t = (1 − α_t) W_{t−1} + S_t                  (forgetting, toward zero, eq. 13)
    y_t = M_{W_t}(q_t)                             (retrieval, eq. 15: a read, no update)

Memory chunks are ``chunk`` positions of a document (``position // chunk``), so a document's memory does not
depend on where it sits in a packed row or on how a decode splits it; ``chunk = 1`` is the per-token recurrence.
Each document starts from the initial weights ``W0`` (a parameter, or a fixed draw with ``learned_init=False``)
and zero momentum; padding changes nothing. Heads are independent: ``W0 [H, ...]`` holds one slice per head and
head ``h``'s update reads only head ``h``'s keys and values.

Decode state: ``{"W", "S", "R": per layer [B, H, d_in, d_out], "conv": tails}``, constant in ``max_len``: a prompt
shorter than a chunk has already updated ``W`` (the gradient of each token is taken at ``R`` when it arrives)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from kernels.common import accumulator, widen
from pmem.core import accounting
from pmem.core.mixer import TokenContext
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.rules import constrain
from pmem.layers.attention import Attention
from pmem.layers.conv import ShortConv
from pmem.layers.deltanet import _l2  # the L2 norm of DeltaNet's q and k
from pmem.layers.init import fan_in_normal
from pmem.layers.linear_recurrence import head_rms
from pmem.layers.recurrence import doc_starts

# gate biases at init: θ = σ(−2)·max_lr ≈ 0.12, η = σ(2) ≈ 0.88, α = σ(−4) ≈ 0.018
GATE_BIAS = (-2.0, 2.0, -4.0)


def memory_apply(Ws: tuple, x: Float[Array, " K"], ln=None, eps: float = 1e-6) -> Float[Array, " K"]:
  """``M_W(x)`` of one head: ``Ws`` the layers' ``[d_in, d_out]``; ``ln = (γ, b)``: ``x + LN(M_W(x))·γ + b``."""
  h = x
  for i, w in enumerate(Ws):
    h = h @ w
    if i + 1 < len(Ws):
      h = jax.nn.gelu(h)
  if ln is None:
    return h
  mu = jnp.mean(h, -1, keepdims=True)
  var = jnp.mean((h - mu) ** 2, -1, keepdims=True)
  return x + (h - mu) * jax.lax.rsqrt(var + eps) * ln[0] + ln[1]


def surprise(Ws: tuple, k, v, ln=None) -> tuple:
  """``∇_W ‖M_W(k) − v‖²`` of one head (eq. 12)."""
  return jax.grad(lambda W: jnp.sum((memory_apply(W, k, ln) - v) ** 2))(Ws)


def clip(g: tuple, max_norm: float | None) -> tuple:
  """``g · min(1, max_norm / ‖g‖)`` over the head's memory weights (None: unclipped)."""
  if max_norm is None:
    return g
  n = jnp.sqrt(sum(jnp.sum(x * x) for x in g))
  return tuple(x * jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-12)) for x in g)


def step(state: dict, W0: tuple, q, k, v, theta, eta, alpha, reset, start, valid, ln=None,
         max_grad_norm: float | None = None):
  """One token for every row and head: ``state = {"W", "S", "R"}`` (per layer ``[B, H, i, o]``), ``q, k, v [B, H,
  K]``, gates ``[B, H]``, ``reset`` (document start), ``start`` (memory-chunk start), ``valid`` ``[B]`` →
  ``(state', y [B, H, K])`` (module docstring)."""
  bc = lambda m, x: m.reshape(m.shape + (1,) * (x.ndim - m.ndim))  # noqa: E731
  W = tuple(jnp.where(bc(reset, w), w0[None], w) for w, w0 in zip(state["W"], W0))
  S = tuple(jnp.where(bc(reset, s), 0.0, s) for s in state["S"])
  R = tuple(jnp.where(bc(reset | start, r), w, r) for r, w in zip(state["R"], W))
  per_head = lambda R, k, v, *ln: clip(surprise(R, k, v, ln or None), max_grad_norm)  # noqa: E731
  ln_axes = () if ln is None else (0, 0)
  g = jax.vmap(jax.vmap(per_head, (0, 0, 0, *ln_axes)), (0, 0, 0, *([None] * len(ln_axes))))(R, k, v, *(ln or ()))
  S2 = tuple(bc(eta, s) * s - bc(theta, x) * x for s, x in zip(S, g))
  W2 = tuple((1 - bc(alpha, w)) * w + s for w, s in zip(W, S2))
  keep = lambda new, old: tuple(jnp.where(bc(valid, n), n, o) for n, o in zip(new, old))  # noqa: E731
  W2, S2 = keep(W2, state["W"]), keep(S2, state["S"])
  R = keep(R, state["R"])
  read = jax.vmap(jax.vmap(lambda W, q, *ln: memory_apply(W, q, ln or None), (0, 0, *ln_axes)),
                  (0, 0, *([None] * len(ln_axes))))
  return {"W": W2, "S": S2, "R": R}, read(W2, q, *(ln or ()))


@SEQUENCE_MIXERS.register("titans")
class NeuralMemory(nnx.Module):
  """The LMM layer (module docstring): ``y = W_o (head_rms(M_{W_t}(q_t)) ⊙ SiLU(x W_g))``.

  ``depth``: layers of the memory MLP (1: linear); ``expand``: its hidden width over the head dim; ``chunk``:
  the memory chunk (positions); ``max_lr``: θ's ceiling; ``max_grad_norm``: clipping of each token's inner
  gradient per head (None: off); ``learned_init``: ``W0`` trained by the outer loop (else a fixed draw);
  ``residual_norm``: ``x + LN(M(x))·γ + b``; ``momentum=False``: ``η = 0`` (``S_t = −θ_t g_t``); ``decay=False``:
  ``α = 0`` (no forgetting); ``conv``: the short conv's width (0: none)."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, depth: int = 2, expand: int = 2,
               chunk: int = 16, conv: int = 4, max_lr: float = 1.0, max_grad_norm: float | None = 1.0,
               learned_init: bool = True, residual_norm: bool = False, momentum: bool = True, decay: bool = True,
               out_scale: float = 1.0,
               dtype: str = "float32", *, rngs: nnx.Rngs):
    if depth < 1 or chunk < 1:
      raise ValueError(f"titans: depth and chunk must be >= 1, got depth={depth}, chunk={chunk}")
    kd = head_dim or d_model // n_heads
    self.d_model, self.n_heads, self.head_dim, self.depth, self.chunk = d_model, n_heads, kd, depth, chunk
    self.max_lr, self.max_grad_norm, self.dtype = max_lr, max_grad_norm, jnp.dtype(dtype)
    self.momentum, self.decay = momentum, decay
    self.dims = (kd, *[expand * kd] * (depth - 1), kd)
    p = rngs.params
    proj = lambda: nnx.Param(fan_in_normal(p(), (d_model, n_heads * kd), d_model), axes=("embed", "heads"))  # noqa: E731
    self.wq, self.wk, self.wv, self.wg = proj(), proj(), proj(), proj()
    self.wo = nnx.Param(fan_in_normal(p(), (n_heads * kd, d_model), n_heads * kd, out_scale), axes=("heads", "embed"))
    self.w_gates = nnx.Param(fan_in_normal(p(), (d_model, 3 * n_heads), d_model), axes=("embed", None))
    self.b_gates = nnx.Param(jnp.repeat(jnp.asarray(GATE_BIAS), n_heads), axes=(None,))
    var = nnx.Param if learned_init else nnx.Variable
    self.W0 = nnx.List([var(jax.random.normal(p(), (n_heads, i, o)) / math.sqrt(i), axes=("heads", None, None))
                        for i, o in zip(self.dims[:-1], self.dims[1:])])
    self.residual_norm = residual_norm
    if residual_norm:
      self.ln_gain = nnx.Param(jnp.ones((n_heads, kd)), axes=("heads", None))
      self.ln_bias = nnx.Param(jnp.zeros((n_heads, kd)), axes=("heads", None))
    self.norm = nnx.Param(jnp.ones((kd,)), axes=(None,))
    self.convs = nnx.Dict({n: ShortConv(n_heads * kd, conv, rngs=rngs) for n in "qkv"} if conv else {})

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    del max_len
    acc = accumulator(dtype)
    zeros = lambda: tuple(jnp.zeros((batch, self.n_heads, i, o), acc)  # noqa: E731
                          for i, o in zip(self.dims[:-1], self.dims[1:]))
    return {"W": zeros(), "S": zeros(), "R": zeros(),
            "conv": {n: jnp.zeros((batch, c.width - 1, c.channels), dtype) for n, c in self.convs.items()}}

  def inputs(self, x: Float[Array, "B T D"], ctx: TokenContext, tails=None):
    """``(q, k, v [B, T, H, K], θ, η, α [B, T, H], tails')``: the projections after the short convs."""
    dt, (b, t, d), h, kd = self.dtype, x.shape, self.n_heads, self.head_dim
    x2 = x.astype(dt).reshape(b * t, d)
    proj = {n: (x2 @ getattr(self, f"w{n}")[...].astype(dt)).reshape(b, t, h * kd) for n in "qkv"}
    new = {}
    for n, c in self.convs.items():
      y, new[n] = c(proj[n], ctx.positions, None if tails is None else tails[n])
      proj[n] = jax.nn.silu(y)
    acc = accumulator(dt)
    q, k, v = (widen(proj[n]).astype(acc).reshape(b, t, h, kd) for n in "qkv")
    z = widen(x2 @ self.w_gates[...].astype(dt)).astype(acc) + self.b_gates[...]
    theta, eta, alpha = jnp.split(jax.nn.sigmoid(z).reshape(b, t, 3, h), 3, axis=2)
    eta, alpha = (g[:, :, 0] if on else jnp.zeros_like(g[:, :, 0]) for g, on in ((eta, self.momentum), (alpha, self.decay)))
    return _l2(q), _l2(k), v, self.max_lr * theta[:, :, 0], eta, alpha, new

  def memory(self, q, k, v, theta, eta, alpha, ctx: TokenContext, state: dict | None):
    """The recurrence over the call's tokens (:func:`step`, a ``lax.scan``) → ``(y [B, T, H, K], state')``."""
    b, t, h, _ = q.shape
    acc = q.dtype
    W0 = tuple(w[...].astype(acc) for w in self.W0)
    if state is None:
      state = {n: tuple(jnp.zeros((b, *w.shape), acc) for w in W0) for n in ("W", "S", "R")}
    valid = ctx.segment_ids > 0
    reset = doc_starts(ctx.positions) & valid
    start = (ctx.positions % self.chunk == 0) & valid
    ln = (self.ln_gain[...].astype(acc), self.ln_bias[...].astype(acc)) if self.residual_norm else None
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, theta, eta, alpha, reset, start, valid))

    def body(s, x):
      return step(s, W0, *x, ln=ln, max_grad_norm=self.max_grad_norm)

    state, y = jax.lax.scan(jax.checkpoint(body), state, xs)
    state = jax.tree.map(lambda a: constrain(a, ("batch", "act_heads", None, None)), state)
    return jnp.moveaxis(y, 0, 1), state

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    dt, (b, t, d), h, kd = self.dtype, x.shape, self.n_heads, self.head_dim
    q, k, v, theta, eta, alpha, tails = self.inputs(x, ctx, None if state is None else state["conv"])
    mem = None if state is None else {n: state[n] for n in ("W", "S", "R")}
    o, mem = self.memory(q, k, v, theta, eta, alpha, ctx, mem)
    o = head_rms(o, self.norm[...]) * jax.nn.silu(x.astype(dt).reshape(b, t, d) @ self.wg[...].astype(dt)
                                                   ).reshape(b, t, h, kd)
    y = o.astype(dt).reshape(b * t, h * kd) @ self.wo[...].astype(dt)
    y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
    if state is None:
      return y
    return y, {**mem, "conv": {n: tails[n].astype(state["conv"][n].dtype) for n in tails}}

  def cost(self, seq_len: int) -> accounting.Cost:
    """Projections, gates and convs, and per token and head: the inner gradient (a forward and a backward of
    the memory MLP, ~3x its matmuls), the momentum and decay updates of every memory weight, and the read."""
    d, h, kd = self.d_model, self.n_heads, self.head_dim
    c = 4 * accounting.dense(d, h * kd) + accounting.dense(h * kd, d) + accounting.dense(d, 3 * h)
    c = c + accounting.vector(3 * h + kd + (2 * h * kd if self.residual_norm else 0))
    c = sum((m.cost(seq_len) for m in self.convs.values()), c)
    w = sum(i * o for i, o in zip(self.dims[:-1], self.dims[1:]))
    init = accounting.Cost(params=h * w, active_params=h * w, bytes_read=4 * h * w)
    return c + init + accounting.Cost(flops=int(h * (3 * 2 * w + 4 * w + 2 * w)))


@SEQUENCE_MIXERS.register("titans_mag")
class MemoryAsGate(nnx.Module):
  """Memory as a gate (§4.2, eq. 26-28): sliding-window attention and the LMM read the same input in parallel,
  combined as ``o = RMS(y_attn)·γ_a ⊙ σ(RMS(y_mem)·γ_m)`` (the normalised memory branch gates the attention);
  ``persistent``: the attention's persistent memory pairs (eq. 19; 0: none); ``chunk``: the LMM's memory chunk;
  ``memory``: the LMM's factory (its other knobs: a ``fdl.Partial(NeuralMemory, ...)``)."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, window: int = 16,
               persistent: int = 4, chunk: int = 16, memory: Callable[..., NeuralMemory] = NeuralMemory,
               out_scale: float = 1.0,
               dtype: str = "float32", kernel_impl: str = "xla", *, rngs: nnx.Rngs):
    self.attn = Attention(d_model, n_heads, n_kv_heads or n_heads, window=window, out_scale=out_scale, dtype=dtype,
                          kernel_impl=kernel_impl, persistent=persistent, rngs=rngs)
    self.lmm = memory(d_model=d_model, n_heads=n_heads, chunk=chunk, out_scale=out_scale, dtype=dtype, rngs=rngs)
    self.g_attn = nnx.Param(jnp.ones((d_model,)), axes=("embed",))
    self.g_mem = nnx.Param(jnp.ones((d_model,)), axes=("embed",))

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    return {"attn": self.attn.init_state(batch, max_len, dtype), "lmm": self.lmm.init_state(batch, max_len, dtype)}

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    if state is None:
      ya, ym, new = self.attn(x, ctx), self.lmm(x, ctx), None
    else:
      (ya, sa), (ym, sm) = self.attn(x, ctx, state["attn"]), self.lmm(x, ctx, state["lmm"])
      new = {"attn": sa, "lmm": sm}
    rms = lambda y, g: widen(y) * jax.lax.rsqrt(jnp.mean(widen(y) ** 2, -1, keepdims=True) + 1e-6) * g[...]  # noqa: E731
    y = (rms(ya, self.g_attn) * jax.nn.sigmoid(rms(ym, self.g_mem))).astype(x.dtype)
    return y if state is None else (y, new)

  def cost(self, seq_len: int) -> accounting.Cost:
    return self.attn.cost(seq_len) + self.lmm.cost(seq_len) + accounting.vector(4 * self.lmm.d_model)
