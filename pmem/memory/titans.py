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
from pmem.layers import adapters
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


@SEQUENCE_MIXERS.register("titans_mac")
class MemoryAsContext(nnx.Module):
  """Memory as context (§4.1, eq. 21-25). A document's tokens fall in segments ``S^(i)`` of ``chunk`` positions
  (``position // chunk``: the LMM's memory chunks, so the segment-start weights are the LMM's ``R``). Token ``t`` of
  segment ``i`` (first token ``s``), in order:

      h_t = M*_{R_i}(q(x_t))                    retrieval (eq. 21) with the weights at the segment's start, which
                                                hold segments < i only (W0 in a document's first segment)
      ỹ_t = Attn([p ‖ h_s..h_t ‖ x_s..x_t])      (eq. 22-23): causal and confined to the segment (and document)
      M_t = update(M_{t−1}; ỹ_t)                the write (eq. 24): the LMM's :func:`step` on its k, v, θ, η, α of
                                                ỹ_t, the gradient at R_i
      o_t = W_o(RMS(M*_t(q(ỹ_t)))·γ ⊙ SiLU(ỹ_t W_g))   ỹ ⊗ M*_t(ỹ) (eq. 25), the read with the updated weights

  Choices the paper leaves open:

  - ``q(·)``, ``k(·)``, ``v(·)``, the gates: the LMM's (:meth:`NeuralMemory.inputs`: projections, short convs + SiLU,
    q / k L2 norm) over two streams, the tokens ``x`` (its q only: the retrieval) and the attention outputs ``ỹ``
    (the write and the output read), each with its own conv history.
  - ``p``: the attention's ``persistent`` learned pairs (un-roped, every query sees them, eq. 19).
  - The h tokens are keys / values through the attention's own W_K, W_V (the paper concatenates them to the
    segment's tokens before one attention), keys roped at their token's position. Causal: token t sees h_t' and
    x_t' for t' <= t of its segment only (the paper's ``[p ‖ h ‖ S^(i)]`` would show a token the reads of later
    tokens); a segment's keys never reach the next segment except through the memory.
  - Write token by token (gradients at R_i, as the LMM's chunks): a token's write reaches the reads of later segments
    only, and a segment cut short (a prompt's end) has written already.
  - ``⊗``: the LMM layer's own output gate (its head RMSNorm, ``W_g``, ``W_o``, out_scale) with ỹ as its input, so
    MAC's memory is the ``titans`` layer run on ỹ plus the retrieval and no parameter is unused; ỹ is the
    attention's output after its W_O (out_scale 1: an inner token).
  - The LMM's ``chunk`` is the segment (``chunk`` here; its factory ``memory`` sets the other knobs).

  Training and decoding run one ``lax.scan`` over the call's tokens (the token above; rematerialised per token):
  attention over ``N_p + 2·chunk`` keys, then the LMM's step. Decode state, constant in ``max_len``: the LMM's
  ``W, S, R``; ``conv``: ``{"x": the retrieval query's conv tail, "y": the LMM's tails over ỹ}``; the current
  segment's buffers ``k, v`` (its tokens' roped keys / values) and ``hk, hv`` (its h tokens'), ``[B, chunk, K, H]``,
  slot ``position % chunk``, with each slot's ``pos`` and ``seg`` ``int32 [B, chunk]``: a slot is seen by a query of
  the same segment id and segment index ``pos // chunk`` at or after it, so segment and document starts need no
  clearing; padding writes nothing."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, persistent: int = 4, chunk: int = 16,
               memory: Callable[..., NeuralMemory] = NeuralMemory, out_scale: float = 1.0, dtype: str = "float32",
               *, rngs: nnx.Rngs):
    if chunk < 1 or persistent < 0 or d_model % n_heads:
      raise ValueError(f"titans_mac: chunk >= 1, persistent >= 0 and n_heads dividing d_model are required, got "
                       f"chunk={chunk}, persistent={persistent}, d_model={d_model}, n_heads={n_heads}")
    self.attn = Attention(d_model, n_heads, n_kv_heads or n_heads, dtype=dtype, persistent=persistent, rngs=rngs)
    self.lmm = memory(d_model=d_model, n_heads=n_heads, chunk=chunk, out_scale=out_scale, dtype=dtype, rngs=rngs)
    if self.lmm.n_heads * self.lmm.head_dim != d_model:
      raise ValueError(f"titans_mac: the memory's heads x head_dim ({self.lmm.n_heads} x {self.lmm.head_dim}) must "
                       f"be d_model={d_model} (its reads are the attention's h tokens)")
    self.chunk, self.dtype = chunk, jnp.dtype(dtype)

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    s = self.lmm.init_state(batch, max_len, dtype)
    kv = lambda: jnp.zeros((batch, self.chunk, self.attn.n_kv_heads, self.attn.head_dim), dtype)  # noqa: E731
    slots = lambda: jnp.zeros((batch, self.chunk), jnp.int32)  # noqa: E731
    return {"W": s["W"], "S": s["S"], "R": s["R"], "conv": {"x": {n: s["conv"][n] for n in s["conv"] if n == "q"},
                                                          "y": s["conv"]},
            "k": kv(), "v": kv(), "hk": kv(), "hv": kv(), "pos": slots(), "seg": slots()}

  def mix(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict):
    """``(ỹ [B, T, D], M*_t(q(ỹ)) [B, T, H, K], h [B, T, H, K], state')``: the call's tokens after ``state``."""
    at, lmm, c, dt, (b, _, d) = self.attn, self.lmm, self.chunk, self.dtype, x.shape
    acc = accumulator(dt)
    W0 = tuple(w[...].astype(acc) for w in lmm.W0)
    ln = (lmm.ln_gain[...].astype(acc), lmm.ln_bias[...].astype(acc)) if lmm.residual_norm else None
    read = jax.vmap(jax.vmap(memory_apply, (0, 0, 0)), (0, 0, None))  # per row and head; ln per head
    q, k, v = at.qkv(x, ctx)
    # the x stream's retrieval queries; its k and v (from zero tails) are unused (pruned by XLA)
    zero = {n: jnp.zeros_like(a) for n, a in state["conv"]["y"].items()}
    qx, *_, tails_x = lmm.inputs(x, ctx, {**zero, **state["conv"]["x"]})

    def body(s, xt):
      qt, kt, vt, qxt, pos, seg = xt
      valid = seg > 0
      reset, start = doc_starts(pos) & valid, (pos % c == 0) & valid
      bc = lambda m, w: m.reshape(m.shape + (1,) * (w.ndim - 1))  # noqa: E731
      R = tuple(jnp.where(bc(reset, r), w0[None], jnp.where(bc(start, r), w, r))  # the R that `step` takes
                for w0, w, r in zip(W0, s["W"], s["R"]))
      h = read(R, qxt, ln)  # eq. 21
      _, hk, hv = at.qkv(h.reshape(b, 1, d), TokenContext(None, pos[:, None], seg[:, None]))
      put = (jnp.arange(c) == (pos % c)[:, None]) & valid[:, None]  # [B, c]: the token's slot (padding: none)
      new = {n: jnp.where(put[:, :, None, None], a.astype(s[n].dtype), s[n])
             for n, a in (("k", kt[:, None]), ("v", vt[:, None]), ("hk", hk), ("hv", hv))}
      new["pos"], new["seg"] = jnp.where(put, pos[:, None], s["pos"]), jnp.where(put, seg[:, None], s["seg"])
      seen = ((new["seg"] == seg[:, None]) & valid[:, None] & (new["pos"] // c == (pos // c)[:, None])
              & (new["pos"] <= pos[:, None]))
      keys, vals = (jnp.concatenate([new[f"h{n}"], new[n]], 1).astype(dt) for n in "kv")
      o = at._attend(qt[:, None], keys, vals, jnp.concatenate([seen, seen], 1)[:, None, None])  # eq. 22-23
      yt = adapters.project(at, "wo", o.reshape(b, -1), ctx.rng)
      qy, ky, vy, th, et, al, ty = lmm.inputs(yt[:, None], TokenContext(None, pos[:, None], seg[:, None]), s["y"])
      mem, m = step({n: s[n] for n in "WSR"}, W0, qy[:, 0], ky[:, 0], vy[:, 0], th[:, 0], et[:, 0], al[:, 0], reset,
                    start, valid, ln=ln, max_grad_norm=lmm.max_grad_norm)  # eq. 24, and the read of eq. 25
      new["y"] = {n: ty[n].astype(s["y"][n].dtype) for n in ty}
      return {**mem, **new}, (yt, m, h)

    carry = {**{n: state[n] for n in ("W", "S", "R", "k", "v", "hk", "hv", "pos", "seg")}, "y": state["conv"]["y"]}
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, qx, ctx.positions, ctx.segment_ids))
    carry, (yt, m, h) = jax.lax.scan(jax.checkpoint(body), carry, xs)
    heads, kv_axes = ("batch", "act_heads", None, None), ("batch", "length", "act_kv_heads", None)
    new = {n: jax.tree.map(lambda a: constrain(a, heads), carry[n]) for n in "WSR"}
    new |= {n: constrain(carry[n], kv_axes) for n in ("k", "v", "hk", "hv")}
    new |= {"pos": carry["pos"], "seg": carry["seg"],
            "conv": {"x": {n: tails_x[n].astype(a.dtype) for n, a in state["conv"]["x"].items()}, "y": carry["y"]}}
    return *(jnp.moveaxis(a, 0, 1) for a in (yt, m, h)), new

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    lmm, dt, (b, t, d) = self.lmm, self.dtype, x.shape
    yt, m, _, new = self.mix(x, ctx, self.init_state(b, t, dt) if state is None else state)
    o = head_rms(m, lmm.norm[...]) * jax.nn.silu(yt.reshape(b * t, d) @ lmm.wg[...].astype(dt)).reshape(m.shape)
    y = o.astype(dt).reshape(b * t, d) @ lmm.wo[...].astype(dt)
    y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
    return y if state is None else (y, new)

  def cost(self, seq_len: int) -> accounting.Cost:
    """The attention's projections and persistent pairs, its scores over the segment's tokens and h tokens seen
    (on average), the h tokens' keys / values; the LMM's cost (its inputs and step on ỹ, its output), plus the
    retrieval: the x stream's query projection and conv and one more forward of the memory MLP per head."""
    at, lmm, c = self.attn, self.lmm, self.chunk
    d, n, nkv, hd = at.d_model, at.n_heads, at.n_kv_heads, at.head_dim
    seen = sum(i % c + 1 for i in range(seq_len)) / seq_len  # segment tokens a query sees (as many h tokens)
    proj = accounting.dense(d, n * hd) + 2 * accounting.dense(d, nkv * hd) + accounting.dense(n * hd, d)
    attn = proj + accounting.vector(2 * at.persistent * nkv * hd) + accounting.Cost(
        flops=int(4 * n * hd * (at.persistent + 2 * seen)) + 2 * 2 * d * nkv * hd)
    w = sum(i * o for i, o in zip(lmm.dims[:-1], lmm.dims[1:]))
    conv = lmm.convs["q"].cost(seq_len).flops if "q" in lmm.convs else 0
    return attn + lmm.cost(seq_len) + accounting.Cost(flops=2 * d * d + conv + lmm.n_heads * 2 * w)
