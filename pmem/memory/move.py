"""Value embeddings mixed into attention's values: MoVE (Li 2026, arXiv 2601.22887) and the LaVE
baseline (nanochat / modded-nanogpt layer-wise value embeddings).

Both are sequence mixers: :class:`pmem.layers.attention.Attention` with its ``mix_values`` hook
overridden, so the mixed value is what attention sees and what its KV cache stores (decode reads
the bank rows of the new token only). ``K`` below is the number
of value heads (``n_kv_heads``; the paper's ``H`` under multi-head attention, where K = H) and
``h`` the head width, so ``d_v = K·h``.

**MoVE** ("move_attention"). A bank ``E ∈ R^{V×M×d_v}`` indexed by token id and a per-layer router

    g = 2·σ(W_G x_t) ∈ (0, 2)^{K×(M+1)}      (W_G zero-init: every gate is exactly 1 at init)
    V̂^{(k)}_t = g^{(k)}_{t,0} · V^{(k)}_t + Σ_{i=1..M} g^{(k)}_{t,i} · E[x_t, i]^{(k)}

(slot 0 gates the ordinary value projection; ``x_t`` is the normed attention input). In the paper
the bank is *one global tensor shared by every attention layer*, looked up once per token. The
decoder builds every layer's mixers independently and scanned stages slice their variables per
layer, so a variable cannot be shared across layers without a decoder change. Hence two modes:

- ``bank="layer"`` (works today): each MoVE layer owns a bank view ``E_ℓ`` (same equations, L×
  the bank parameters).
- ``bank="shared"``: the layer owns no bank and reads the looked-up rows ``[B, T, M·d_v]`` from
  ``ctx.features["move"]``, which :class:`MoveBank` computes once per forward. This needs the
  decoder to build a ``MoveBank`` once and call it before the stages, e.g. a
  ``DecoderConfig.shared: tuple[tuple[str, Factory], ...]`` whose modules' outputs are added to
  ``ctx.features`` (and whose ``cost`` is added to the decoder's).

**LaVE** ("lave_attention"). nanochat: one table ``VE_ℓ ∈ R^{V×d_v}`` per layer on alternating
layers (:func:`lave_layers`: ``ℓ % 2 == (L−1) % 2``, the last layer always has one), mixed as

    v ← v + c · σ(W_ℓ x_t[:C]) ⊙ VE_ℓ[x_t]      (one gate per value head; W_ℓ zero-init)

with ``(C, c) = (32, 2)`` (older nanochat; the newer one uses (12, 3)). Value-embedding rows are
initialised like the value projection (std d^-0.5; nanochat draws them uniform with that std,
here a truncated normal as ``wv``). The MoVE bank uses the same init (no official MoVE code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core import accounting
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.core.variables import MemoryTable
from pmem.layers.attention import Attention
from pmem.layers.init import fan_in_normal
from pmem.memory import diagnostics
from pmem.memory.edit import token_rows
from pmem.core.mixer import TokenContext

MOVE_FEATURE = "move"
BANKS = ("layer", "shared")


def lave_layers(n_layers: int) -> tuple[int, ...]:
  """nanochat's value-embedding layers: alternating, the last layer always included."""
  return tuple(i for i in range(n_layers) if i % 2 == (n_layers - 1) % 2)


def _value_table(key, vocab: int, width: int, d_model: int) -> MemoryTable:
  """A token-indexed table of value-sized rows, initialised like the value projection."""
  # index="inputs": rows are read at the batch's input token ids (known before the forward).
  return MemoryTable(fan_in_normal(key, (vocab, width), d_model), axes=("table_rows", None), index="inputs")


class MoveBank(nnx.Module):
  """The shared MoVE bank ``E ∈ R^{V×M×d_v}``, stored ``[V, M·d_v]`` (slot-major rows):
  ``bank(ids)`` is the once-per-token lookup every ``bank="shared"`` MoVE layer reads from
  ``ctx.features[MOVE_FEATURE]``. ``d_v = n_kv_heads · (head_dim or d_model // n_heads)``, the value
  width of the attention layers it serves (given their head counts; ``d_model`` and ``vocab`` come
  from the decoder)."""

  def __init__(self, d_model: int, vocab: int, n_slots: int, n_heads: int, n_kv_heads: int,
               head_dim: int | None = None, dtype: str = "float32", *, rngs: nnx.Rngs):
    width = n_kv_heads * (head_dim or d_model // n_heads)
    self.vocab, self.n_slots, self.width, self.dtype = vocab, n_slots, width, jnp.dtype(dtype)
    self.table = _value_table(rngs.params(), vocab, n_slots * width, d_model)

  def __call__(self, ids: Int[Array, "B T"], ctx: TokenContext) -> Float[Array, "B T MW"]:
    diagnostics.usage("move", ids, self.vocab)
    return token_rows(self.table, ctx).astype(self.dtype)

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.lookup(self.vocab, self.n_slots * self.width, rows_read=1)


@SEQUENCE_MIXERS.register("move_attention")
class MoveAttention(Attention):
  """Attention whose values are MoVE mixtures (module docstring)."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, vocab: int, n_slots: int,
               head_dim: int | None = None, rope_theta: float = 10000.0, bank: str = "layer",
               window: int | None = None, out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if bank not in BANKS:
      raise ValueError(f"MoVE bank must be one of {BANKS}, got {bank!r}")
    if n_slots < 1:
      raise ValueError(f"MoVE needs n_slots >= 1, got {n_slots}")
    super().__init__(d_model, n_heads, n_kv_heads, head_dim, rope_theta, window, out_scale, dtype, rngs=rngs)
    self.vocab, self.n_slots, self.bank_mode = vocab, n_slots, bank
    self.w_router = nnx.Param(jnp.zeros((d_model, n_kv_heads, n_slots + 1)), axes=("embed", "kv_heads", None))
    if bank == "layer":
      self.bank = _value_table(rngs.params(), vocab, n_slots * n_kv_heads * self.head_dim, d_model)

  def bank_rows(self, ctx: TokenContext) -> Float[Array, "B T MW"]:
    """``E[x_t]`` for every token, ``[B, T, M·d_v]``."""
    if self.bank_mode == "layer":
      diagnostics.usage("move", ctx.ids, self.vocab)
      return token_rows(self.bank, ctx)
    if MOVE_FEATURE not in ctx.features:
      raise KeyError(f"MoveAttention(bank='shared') reads the shared bank's rows from "
                     f"ctx.features[{MOVE_FEATURE!r}] (MoveBank), which this context lacks")
    rows, want = ctx.features[MOVE_FEATURE], self.n_slots * self.n_kv_heads * self.head_dim
    if rows.shape[-1] != want:
      raise ValueError(f"MoVE attention needs shared bank rows of n_slots·n_kv_heads·head_dim = {want} but the "
                       f"MoveBank in model.shared gives {rows.shape[-1]}; give both the same n_slots and heads")
    return rows

  def mix_values(self, v: Float[Array, "B T K H"], x: Float[Array, "B T D"],
                 ctx: TokenContext) -> Float[Array, "B T K H"]:
    dt, (b, t, k, h), m, d = v.dtype, v.shape, self.n_slots, x.shape[-1]
    z = x.reshape(b * t, d) @ self.w_router[...].astype(dt).reshape(d, k * (m + 1))
    g = 2.0 * jax.nn.sigmoid(z.reshape(b, t, k, m + 1))
    e = self.bank_rows(ctx).astype(dt).reshape(b, t, m, k, h)
    mem = (jnp.moveaxis(g[..., 1:], -1, 2)[..., None] * e).sum(axis=2)  # Σ_i g_i E[x, i]
    return g[..., :1] * v + mem

  def cost(self, seq_len: int) -> accounting.Cost:
    k, m = self.n_kv_heads, self.n_slots
    c = super().cost(seq_len) + accounting.dense(self.d_model, k * (m + 1))  # the router; mixing is element-wise
    if self.bank_mode == "layer":
      c = c + accounting.lookup(self.vocab, m * k * self.head_dim, rows_read=1)
    return c


@SEQUENCE_MIXERS.register("lave_attention")
class LaveAttention(Attention):
  """Attention with a gated layer-wise value embedding (module docstring)."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, vocab: int, head_dim: int | None = None,
               rope_theta: float = 10000.0, gate_channels: int = 32, gate_scale: float = 2.0,
               window: int | None = None, out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if not 0 < gate_channels <= d_model:
      raise ValueError(f"LaVE gate_channels={gate_channels} must lie in 1..d_model={d_model}")
    super().__init__(d_model, n_heads, n_kv_heads, head_dim, rope_theta, window, out_scale, dtype, rngs=rngs)
    self.vocab, self.gate_channels, self.gate_scale = vocab, gate_channels, gate_scale
    self.table = _value_table(rngs.params(), vocab, n_kv_heads * self.head_dim, d_model)
    self.w_gate = nnx.Param(jnp.zeros((gate_channels, n_kv_heads)), axes=(None, "kv_heads"))

  def mix_values(self, v: Float[Array, "B T K H"], x: Float[Array, "B T D"],
                 ctx: TokenContext) -> Float[Array, "B T K H"]:
    dt, (b, t, k, h), c = v.dtype, v.shape, self.gate_channels
    z = x[..., :c].reshape(b * t, c) @ self.w_gate[...].astype(dt)
    g = self.gate_scale * jax.nn.sigmoid(z).reshape(b, t, k, 1)
    diagnostics.usage("lave", ctx.ids, self.vocab)
    return v + g * token_rows(self.table, ctx).astype(dt).reshape(b, t, k, h)

  def cost(self, seq_len: int) -> accounting.Cost:
    k = self.n_kv_heads
    return (super().cost(seq_len) + accounting.dense(self.gate_channels, k)
            + accounting.lookup(self.vocab, k * self.head_dim, rows_read=1))
