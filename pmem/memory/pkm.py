"""Product-key memory layers: PKM (Lample et al., NeurIPS 2019, arXiv 1907.05242) and Memory+
(Berges et al., "Memory Layers at Scale", arXiv 2412.09764). modules.md §4.

Retrieval (§4(a)), per token ``x ∈ R^d`` and head ``h = 1..H``, with ``n = √N`` sub-keys per half:

    q_h = norm(W_q x)_h = [q¹_h; q²_h] ∈ R^{d_k}          (each half of width d_k/2 normalized alone)
    s¹ = K¹_h q¹_h,  s² = K²_h q²_h ∈ R^n                 (K¹_h, K²_h ∈ R^{n × d_k/2})
    I¹, I² = top-k(s¹), top-k(s²)                          (k each)
    (scores, ids) = top-k{ (s¹_i + s²_j, i·n + j) : i ∈ I¹, j ∈ I² }     (exact top-k of the k² sums)
    w_h = softmax(scores)                                  (float32)
    o = Σ_h Σ_{r≤k} w_{h,r} · V[ids_{h,r}]                 (an embedding bag of H·k rows, V ∈ R^{N × d_v})

The top-k of the k² sums is the top-k over all N = n² slots; only the ~k·ln k pairs of ranks that
can reach it are summed (:func:`kernels.product_topk`). ``implementation`` picks the kernels of the
top-k and the bag (``kernels.IMPLEMENTATIONS``; on CPU ``auto`` takes the native C++ ones).

Outputs (``PKM``: "pkm", ``MemoryPlus``: "memory_plus"):

    PKM:     y = o  (d_v = d),  or W_out o (d_v ≠ d)
    Memory+: y = W_out(o ⊙ SiLU(W_in x))                  (the reference's "swilu" projection)
    gated:   y ← σ(w_g · x) · y                            (either variant, ``gated=True``)

Query normalization (``query_norm``), applied to each half-query of width d_k/2 with one learned
scale (and bias) shared by all heads and halves, as lucidrains' ``PKM``: ``"layernorm"`` (default),
``"rmsnorm"``, ``"none"`` (Meta's ``HashingMemory``). Lample's BatchNorm is refused: batch
statistics mix positions, which leaks future tokens in causal training. ``qk_norm=True`` (the
Memory+ paper's qk-norm) also RMS-normalizes every sub-key (one learned scale of width d_k/2), so
both sides of the score are normalized.

Values are a :class:`MemoryTable` without ``index=`` (its ids come from the top-k, so it stays on
the device) read only through :func:`pmem.memory.lookup.bag`: the row-sparse optimizer and row
sharding apply. With ``values="<name>"`` the layer owns no table and reads the one
:class:`PKMValues` in ``DecoderConfig.shared`` builds (``ctx.features[name]``): Meta's
``mem_share_values``, one table for every memory layer, each keeping its own queries, keys and
projections. Such layers must not be stacked into one scanned stage (row-sparse reads are matched
to their probes by trace order): the layer takes its index ``layer`` from the decoder, so the decoder
builds each memory layer alone (:mod:`pmem.core.mixer`).

Init (Meta's ``HashingMemory``): sub-keys uniform ±1/√d_k, values N(0, 1/d_v), W_q xavier-uniform,
W_in and W_out N(0, 1/d) (W_out times the decoder's depth factor ``out_scale``), w_g N(0, 1/d); no
biases. Selected value ids are reported to :func:`pmem.memory.diagnostics.usage` under ``"pkm"``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels import candidate_pairs, product_topk
from kernels.common import check_name, widen
from pmem.core import accounting
from pmem.core.registry import CHANNEL_MIXERS
from pmem.core.rules import constrain
from pmem.core.variables import MemoryTable
from pmem.memory import diagnostics, lookup
from pmem.core.mixer import TokenContext

QUERY_NORMS = ("layernorm", "rmsnorm", "none")
VALUES_FEATURE = "pkm_values"


def middle_layer(n_layers: int) -> tuple[int]:
  """The default placement of one memory layer: ``n_layers // 2``."""
  return (n_layers // 2,)


def xavier_uniform(key, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
  """torch ``xavier_uniform_``: U(±sqrt(6 / (fan_in + fan_out)))."""
  bound = (6.0 / (shape[0] + shape[1])) ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _values_table(key, n_keys: int, d_v: int) -> MemoryTable:
  # no index=: rows are chosen by the top-k inside the forward (never host-resident)
  return MemoryTable(d_v ** -0.5 * jax.random.normal(key, (n_keys * n_keys, d_v)), axes=("table_rows", None))


def _normalize(x: jax.Array, kind: str, eps: float) -> jax.Array:
  """LayerNorm / RMSNorm statistics over the last dim, in float32, without the affine part."""
  x32 = widen(x)
  if kind == "layernorm":
    x32 = x32 - x32.mean(-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


class PKMValues(nnx.Module):
  """The value table shared by every memory layer built with ``values=<feature name>``; called once
  per forward, it hands the table itself (or, in a row-sparse train step, its ``lookup.Tap``) to the
  layers through ``ctx.features``."""

  def __init__(self, d_model: int, n_keys: int, d_v: int | None = None, dtype: str = "float32", *,
               rngs: nnx.Rngs):
    del dtype
    self.n_keys, self.d_v = n_keys, d_v or d_model
    self.values = _values_table(rngs.params(), n_keys, self.d_v)

  def __call__(self, ids: Int[Array, "B T"], ctx: TokenContext | None = None):
    del ids, ctx
    return self.values.get_value()

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.Cost(params=self.n_keys ** 2 * self.d_v)  # reads are counted by the layers


@CHANNEL_MIXERS.register("pkm")
class PKM(nnx.Module):
  """Product-key memory replacing an FFN (module docstring); ``MemoryPlus`` adds the swilu output.

  ``n_keys``: sub-keys per half (√N; N = n_keys² slots), ``heads``: H, ``k``: rows per head,
  ``d_k``: query width per head (two halves of d_k/2), ``d_v``: value width (default d_model),
  ``values``: name of a shared :class:`PKMValues` feature (None: the layer owns its table),
  ``layer``: the layer's index (from the decoder; it keeps memory layers out of scanned stacks)."""

  swilu = False

  def __init__(self, d_model: int, n_keys: int = 128, heads: int = 4, k: int = 32, d_k: int = 256,
               d_v: int | None = None, query_norm: str = "layernorm", qk_norm: bool = False, gated: bool = False,
               values: str | None = None, layer: int | None = None, eps: float = 1e-5, implementation: str = "auto",
               out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if query_norm == "batchnorm":
      raise ValueError("query_norm='batchnorm' is not offered: BatchNorm's batch statistics mix all positions, "
                       "leaking future tokens into causal training; use one of " + str(QUERY_NORMS))
    if query_norm not in QUERY_NORMS:
      raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
    if qk_norm and query_norm == "none":
      raise ValueError("qk_norm=True normalizes queries and keys: set query_norm to 'rmsnorm' or 'layernorm'")
    if d_k < 2 or d_k % 2:
      raise ValueError(f"d_k must be even and >= 2 (two half-queries), got {d_k}")
    if not 1 <= k <= n_keys:
      raise ValueError(f"k must lie in 1..n_keys={n_keys} (top-k of each half), got {k}")
    if heads < 1:
      raise ValueError(f"heads must be >= 1, got {heads}")
    check_name(implementation)
    key = rngs.params
    self.d_model, self.n_keys, self.heads, self.k, self.d_k = d_model, n_keys, heads, k, d_k
    self.d_v, self.query_norm, self.qk_norm, self.gated = d_v or d_model, query_norm, qk_norm, gated
    self.values_feature, self.layer, self.eps, self.dtype = values, layer, eps, jnp.dtype(dtype)
    self.implementation = implementation
    half, d = d_k // 2, d_model
    self.w_q = nnx.Param(xavier_uniform(key(), (d, heads * d_k)), axes=("embed", "heads"))
    bound = d_k ** -0.5
    # drawn as Meta's [2·H·n, d_k/2] parameter (a 4-D draw compiles ~10 s slower on XLA:CPU)
    keys = jax.random.uniform(key(), (heads * 2 * n_keys, half), jnp.float32, -bound, bound)
    self.keys = nnx.Param(keys.reshape(heads, 2, n_keys, half), axes=("heads", None, None, None))
    if query_norm != "none":
      self.q_scale = nnx.Param(jnp.ones((half,)), axes=(None,))
    if query_norm == "layernorm":
      self.q_bias = nnx.Param(jnp.zeros((half,)), axes=(None,))
    if qk_norm:
      self.k_scale = nnx.Param(jnp.ones((half,)), axes=(None,))
    if values is None:
      self.values = _values_table(key(), n_keys, self.d_v)
    if self.swilu:
      self.w_in = nnx.Param(d ** -0.5 * jax.random.normal(key(), (d, self.d_v)), axes=("embed", "mlp"))
    self.project = self.swilu or self.d_v != d  # W_out
    if self.project:
      self.w_out = nnx.Param(out_scale * d ** -0.5 * jax.random.normal(key(), (self.d_v, d)), axes=("mlp", "embed"))
    if gated:
      self.w_g = nnx.Param(d ** -0.5 * jax.random.normal(key(), (d,)), axes=("embed",))

  @property
  def num_slots(self) -> int:
    return self.n_keys ** 2

  def _table(self, ctx: TokenContext):
    if self.values_feature is None:
      return self.values
    if self.values_feature not in ctx.features:
      raise KeyError(f"PKM(values={self.values_feature!r}) reads the shared value table from ctx.features"
                     f"[{self.values_feature!r}] (PKMValues in DecoderConfig.shared), which this context lacks")
    return ctx.features[self.values_feature]

  def retrieve(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T H k"], Int[Array, "B T H k"]]:
    """Top-k scores (before the softmax) and value slots of every head."""
    dt, (b, t, d), h, half = self.dtype, x.shape, self.heads, self.d_k // 2
    q = (x.astype(dt).reshape(b * t, d) @ self.w_q[...].astype(dt)).reshape(b * t, h, 2, half)
    keys = self.keys[...]
    if self.query_norm != "none":
      q = _normalize(q, self.query_norm, self.eps) * self.q_scale[...].astype(dt)
      if self.query_norm == "layernorm":
        q = q + self.q_bias[...].astype(dt)
    if self.qk_norm:
      keys = _normalize(keys, "rmsnorm", self.eps) * self.k_scale[...]
    q = q.transpose(2, 1, 0, 3)  # [2, H, BT, d_k/2]: per-half batched matmuls, top-k rows without transposes
    s1, s2 = (jnp.einsum("htc,hnc->htn", q[p], keys[:, p].astype(dt)) for p in (0, 1))
    scores, slots = product_topk(s1, s2, self.k, implementation=self.implementation)  # [H, BT, k]
    out = lambda a: a.transpose(1, 0, 2).reshape(b, t, h, self.k)
    return out(scores), out(slots)

  def read(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T Dv"]:
    """o = Σ_h Σ_r softmax(scores_h)_r · V[slot_{h,r}]."""
    b, t, _ = x.shape
    scores, slots = self.retrieve(x)
    diagnostics.usage("pkm", slots, self.num_slots)
    w = jax.nn.softmax(widen(scores), -1)
    return lookup.bag(self._table(ctx), slots.reshape(b, t, -1), w.reshape(b, t, -1),
                      implementation=self.implementation)

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T D"]:
    dt, (b, t, d) = self.dtype, x.shape
    o = self.read(x, ctx).astype(dt).reshape(b * t, self.d_v)
    x2 = x.astype(dt).reshape(b * t, d)
    if self.swilu:
      o = o * jax.nn.silu(x2 @ self.w_in[...].astype(dt))
    y = o @ self.w_out[...].astype(dt) if self.project else o
    if self.gated:
      y = jax.nn.sigmoid(x2 @ self.w_g[...].astype(dt))[:, None] * y
    return constrain(y.reshape(b, t, d), ("batch", "length", "embed"))

  def cost(self, seq_len: int) -> accounting.Cost:
    """FLOPs per token: query 2·d·H·d_k, sub-key scores 2·H·√N·d_k, H·|candidate_pairs(k)| candidate
    sums, Memory+ 4·d·d_v, the gate 2·d. Every key is read, and H·k value rows."""
    d, h, n, dk, dv = self.d_model, self.heads, self.n_keys, self.d_k, self.d_v
    c = accounting.dense(d, h * dk) + accounting.dense(dk // 2, 2 * h * n)  # W_q; the keys as one matmul
    c = c + accounting.Cost(flops=h * len(candidate_pairs(self.k)[0]))  # the candidate sums of each head
    n_vectors = {"none": 0, "rmsnorm": 1, "layernorm": 2}[self.query_norm] + self.qk_norm  # norm scales, bias
    c = c + accounting.vector(dk // 2) * n_vectors
    rows = accounting.lookup(self.num_slots, dv, rows_read=h * self.k)
    c = c + (rows if self.values_feature is None else dataclasses.replace(rows, params=0))  # shared: PKMValues
    if self.swilu:
      c = c + accounting.dense(d, dv)
    if self.project:
      c = c + accounting.dense(dv, d)
    if self.gated:
      c = c + accounting.dense(d, 1)
    return c


@CHANNEL_MIXERS.register("memory_plus")
class MemoryPlus(PKM):
  """Memory+: y = W_out(o ⊙ SiLU(W_in x)) (optionally gated); the PKM retrieval and arguments."""

  swilu = True
