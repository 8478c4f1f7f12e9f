"""Engram (DeepSeek-AI and PKU, arXiv 2601.07372): conditional memory by hashed n-gram lookup.

**Host side** (NumPy int64 in the input pipeline, no jit; the algorithm of the published demo
``deepseek-ai/Engram: engram_demo_v1.py``, bit for bit):

1. Compression ``P: V → V'`` (§2.2): a token's decoded text is keyed by NFKC → NFD → strip accents
   (category Mn) → lowercase → runs of ``[ \\t\\r\\n]`` to one space → strip, where a text that is
   then exactly ``" "`` stays ``" "``; a text containing U+FFFD (a partial UTF-8 sequence) is keyed
   by its raw vocabulary string, one normalising to ``""`` by its text. Canonical ids are numbered
   in order of first appearance over raw ids 0..V−1 (:func:`compression`). Hashing only: the
   model's input and output ids are unchanged.
2. Suffix n-grams ``g_{t,n} = (x'_{t−n+1}, …, x'_t)``, n = 2..N. Token ``t−j`` is used only when
   ``positions[t] >= j`` (same document); otherwise the canonical id of ``pad_id`` (pmem's choice:
   raw id 0 by default; the demo pads sequence starts with raw id 2).
3. Multiplicative-XOR hash: ``s_{t,n} = XOR_{j<n} x'_{t−j}·r_j`` and ``z_{t,n,k} = s_{t,n} mod
   p_{n,k}`` for heads k = 1..K, with odd multipliers ``r_j = 2u + 1``, ``u`` uniform in
   ``[0, ⌊M_max/2⌋)``, ``M_max = ⌊(2^63 − 1)/|V'|⌋`` (so every product fits in int64), drawn by
   ``np.random.default_rng(seed + 10007·ℓ)`` (:func:`multipliers`), and prime table sizes distinct
   across every layer, order and head of the model (:func:`table_primes`).

**Device side**, for a layer with M branches over the block's normed input ``h_t``:

    e_t = concat_{n,k} E_{n,k}[z_{t,n,k}] ∈ R^{d_mem}     (one packed table, row offsets per head)
    v   = W_V e_t + b_V
    s_m = <RMSNorm(W_K^m e_t + b_K^m), RMSNorm(h_t)> / sqrt(d),   α_m = σ(s_m)        (paper §2.3)
          gate="sqrt": α_m = σ(sign(s_m)·sqrt(max(|s_m|, 1e-6))) (the demo); "none": α_m = 1
    ṽ_m = α_m v
    Y_m = ṽ_m + SiLU(Σ_{j<4} w_{m,j} ⊙ RMSNorm(ṽ_m)_{t−jN})   (depthwise causal conv, dilation N)
    y   = (1/M) Σ_m Y_m

The conv is zero-initialised (paper v2), so at init ``y = α v``. In decode (``pmem.core.mixer``)
the host hashes each new token from the ``N − 1`` before it (``host_history``) and the layer's
state is the conv's tail, the conv inputs of the last ``3N`` tokens. Tap ``j`` reads position ``t − jN``
(torch ``Conv1d`` kernel index ``3 − j``) and is zero where that lies before the document start
(``positions[t] < jN``). The branch is added to the residual stream at the start of the block,
before attention (``LayerOverride(pre=...)``).

**Branches.** In the paper M is the number of hyper-connection (mHC) residual streams: each branch
has its own hidden state, gate and output stream. pmem's backbone has one residual stream, so here
all M branches read the same ``h`` and their outputs are averaged: ``branches > 1`` only adds
per-branch key projections, norms and conv filters (an ensemble of gates), not hyper-connections.

Init: table rows N(0, 1/d) truncated (the token embedding's init; the demo draws both N(0, 1));
W_V, W_K truncated normal with std d_mem^-1/2 (W_V times ``out_scale``); biases 0 (the demo's
projections have biases); norm scales 1; conv 0. All Engram layers of a model must share
``table_sizes``, ``max_order``, ``heads`` and ``seed`` (``configs/engram.py`` builds them so).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int
from tokenizers import Regex, normalizers

from pmem.core import accounting
from pmem.core.registry import CHANNEL_MIXERS
from pmem.core.rules import constrain
from pmem.core.variables import MemoryTable
from pmem.layers.conv import causal_conv
from pmem.layers.init import fan_in_normal
from pmem.memory import diagnostics, edit, lookup
from pmem.core.mixer import HostFeatures, TokenContext
from kernels.common import accumulator, widen

GATES = ("paper", "sqrt", "none")
KERNEL = 4  # conv taps (paper, demo)
LAYER_SEED_STRIDE = 10007  # multipliers of layer ℓ come from seed + 10007·ℓ (demo)
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # Miller-Rabin bases, exact below 3.3e24


def feature(layer: int) -> str:
  """The batch field holding layer ``layer``'s packed-table row ids ``[B, T, (N−1)·K]``."""
  return f"engram/{layer}"


# ---------------------------------------------------------------------------------- host side


def is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
  if n < 2:
    return False
  for p in _WITNESSES:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d, s = d // 2, s + 1
  for a in _WITNESSES:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


@functools.lru_cache(maxsize=None)
def table_primes(table_sizes: tuple[int, ...], heads: int, layers: tuple[int, ...]
                 ) -> tuple[tuple[tuple[int, ...], ...], ...]:
  """Head-table sizes ``[layer][order n − 2][head]`` for ``layers`` in order (§2.2, demo): for each
  (layer, order) the search starts at ``table_sizes[n − 2] − 1`` and each head takes the smallest
  prime above the running start that no table of the model has yet, then starts from it."""
  seen, out = set(), []
  for _ in layers:
    per_order = []
    for size in table_sizes:
      p, row = size - 1, []
      for _ in range(heads):
        p += 1
        while p in seen or not is_prime(p):
          p += 1
        seen.add(p)
        row.append(p)
      per_order.append(tuple(row))
    out.append(tuple(per_order))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def multipliers(seed: int, layer: int, max_order: int, vocab: int) -> tuple[int, ...]:
  """Odd multipliers ``r_0..r_{N−1}`` of layer ``layer`` for ``vocab = |V'|`` canonical ids."""
  half = max(1, np.iinfo(np.int64).max // vocab // 2)
  u = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer).integers(0, half, size=max_order, dtype=np.int64)
  return tuple(int(r) for r in 2 * u + 1)


def _normalizer() -> normalizers.Normalizer:
  lone = "\ue000"  # a private-use stand-in that carries a text of exactly " " through the strip
  return normalizers.Sequence([
      normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), lone),
      normalizers.Strip(), normalizers.Replace(lone, " ")])


@functools.lru_cache(maxsize=8)
def compression(tokenizer) -> tuple[np.ndarray, int]:
  """``(P, |V'|)``: the canonical id ``P[i]`` of every raw id (int64 ``[V]``, read-only), step 1 of
  the module docstring. ``tokenizer`` needs ``vocab_size``, ``decode`` and ``token_strings``
  (:mod:`pmem.data.tokenizer`)."""
  if not callable(getattr(tokenizer, "token_strings", None)):
    raise TypeError(f"Engram compression needs a tokenizer with token_strings() (raw vocabulary strings); "
                    f"{type(tokenizer).__name__} has none")
  norm, raw = _normalizer(), tokenizer.token_strings()
  keys: dict[str, int] = {}
  p = np.empty(tokenizer.vocab_size, np.int64)
  for i in range(tokenizer.vocab_size):
    text = tokenizer.decode([i])
    key = raw[i] if "\ufffd" in text else (norm.normalize_str(text) or text)
    p[i] = keys.setdefault(key, len(keys))
  p.flags.writeable = False
  return p, len(keys)


def ngram_hashes(ids: Int[np.ndarray, "B T"], positions: Int[np.ndarray, "B T"], pad: int,
                 mult: Sequence[int], sizes: Sequence[Sequence[int]]) -> Int[np.ndarray, "B T H"]:
  """``z_{t,n,k}`` (int64, H = (N−1)·K ordered (n, k)) of canonical ids ``ids`` (steps 2-3):
  ``mult`` holds r_0..r_{N−1}, ``sizes[n − 2]`` the K head-table sizes of order n."""
  x, pos = np.asarray(ids, np.int64), np.asarray(positions)
  t, mix, out = x.shape[1], None, []
  for j in range(len(sizes) + 1):
    prev = np.pad(x, ((0, 0), (j, 0)), constant_values=pad)[:, :t]  # x'_{t−j}
    term = np.where(pos >= j, prev, pad) * np.int64(mult[j])  # the pad id before the document start
    mix = term if mix is None else mix ^ term  # s_{t, j+1}
    if j:
      out += [mix % np.int64(p) for p in sizes[j - 1]]
  return np.stack(out, -1)


# -------------------------------------------------------------------------------- device side


def _rows(table: MemoryTable, ids: Int[Array, "..."]) -> Float[Array, "... D"]:
  """The one table read of this file (row-sparse training swaps what it does)."""
  return lookup.gather(table, ids)


def _rms(x: Float[Array, "... D"], eps: float = 1e-6) -> Float[Array, "... D"]:
  """RMS normalisation in float32, without the scale (per-branch scales are applied by the caller)."""
  x = widen(x)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


@CHANNEL_MIXERS.register("engram")
class Engram(nnx.Module):
  """One Engram layer (module docstring); ``layer`` is this layer's index (from the decoder) and
  ``layers`` all Engram layers of the model in order (prime table sizes are distinct across all of them).

  ``table_sizes``: base rows per head table, one per order 2..N (an int serves every order; default
  5 × the model's ``vocab``, the demo's); ``d_mem``: default ``d_model``;
  ``capacity_one``: every head table has a single row (the capacity-1 control, modules.md §2(e));
  ``compress=False``: hash raw ids; ``gate``: one of ``GATES``; ``conv=False``: no conv branch."""

  def __init__(self, d_model: int, layer: int, layers: Sequence[int], d_mem: int | None = None,
               table_sizes: int | Sequence[int] | None = None, max_order: int = 3, heads: int = 8,
               compress: bool = True, gate: str = "paper", conv: bool = True, capacity_one: bool = False,
               branches: int = 1, seed: int = 0, pad_id: int = 0, vocab: int | None = None,
               out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    layers = tuple(int(i) for i in layers)
    d_mem = d_mem or d_model
    if table_sizes is None:
      if vocab is None:
        raise ValueError("Engram needs table_sizes or the model's vocab (table_sizes = 5 * vocab per order)")
      table_sizes = 5 * vocab
    if gate not in GATES:
      raise ValueError(f"Engram gate must be one of {GATES}, got {gate!r}")
    if max_order < 2:
      raise ValueError(f"Engram max_order must be >= 2 (orders 2..max_order), got {max_order}")
    if heads < 1 or branches < 1:
      raise ValueError(f"Engram heads and branches must be >= 1, got heads={heads}, branches={branches}")
    if len(set(layers)) != len(layers) or layer not in layers:
      raise ValueError(f"Engram layers must be distinct and contain layer={layer}, got {layers}")
    sizes = (table_sizes,) * (max_order - 1) if isinstance(table_sizes, int) else tuple(int(s) for s in table_sizes)
    if len(sizes) != max_order - 1 or min(sizes) < 1:
      raise ValueError(f"Engram table_sizes must be one positive size per order 2..{max_order}, got {table_sizes!r}")
    n_tables = (max_order - 1) * heads
    if d_mem % n_tables:
      raise ValueError(f"Engram d_mem={d_mem} must be divisible by (max_order - 1) * heads = {n_tables}")
    if pad_id < 0:
      raise ValueError(f"Engram pad_id must be a token id >= 0, got {pad_id}")
    self.d_model, self.layer, self.layers, self.d_mem = d_model, layer, layers, d_mem
    self.max_order, self.heads, self.branches = max_order, heads, branches
    self.n_tables, self.d_head = n_tables, d_mem // n_tables
    self.compress, self.gate, self.conv, self.capacity_one = compress, gate, conv, capacity_one
    self.seed, self.pad_id, self.dtype = seed, pad_id, jnp.dtype(dtype)
    self.feature = feature(layer)
    self.host_history = max_order - 1  # the host hashes read the N−1 tokens before each one
    # sizes[n − 2][k]; the plan of the whole model, so primes stay distinct with or without this control
    self.sizes = (((1,) * heads,) * (max_order - 1) if capacity_one
                  else table_primes(sizes, heads, layers)[layers.index(layer)])
    flat = [p for order in self.sizes for p in order]
    self.offsets, self.num_rows = tuple(int(o) for o in np.cumsum([0, *flat[:-1]])), sum(flat)
    if self.num_rows >= 2 ** 31:
      raise ValueError(f"Engram table has {self.num_rows} rows; row ids must fit in int32")
    k, d, m = rngs.params, d_model, branches
    self.table = MemoryTable(fan_in_normal(k(), (self.num_rows, self.d_head), d),
                             axes=("table_rows", None), index=self.feature)
    self.w_v = nnx.Param(fan_in_normal(k(), (d_mem, d), d_mem, scale=out_scale), axes=(None, "embed"))
    self.b_v = nnx.Param(jnp.zeros((d,)), axes=("embed",))
    if gate != "none":
      self.w_k = nnx.Param(fan_in_normal(k(), (d_mem, m, d), d_mem), axes=(None, None, "embed"))
      self.b_k = nnx.Param(jnp.zeros((m, d)), axes=(None, "embed"))
      self.scale_k = nnx.Param(jnp.ones((m, d)), axes=(None, "embed"))  # RMSNorm₁ of each branch
      self.scale_h = nnx.Param(jnp.ones((m, d)), axes=(None, "embed"))  # RMSNorm₂ of each branch
    if conv:
      self.scale_c = nnx.Param(jnp.ones((m, d)), axes=(None, "embed"))  # the conv input's RMSNorm
      self.w_conv = nnx.Param(jnp.zeros((KERNEL, m, d)), axes=(None, None, "embed"))  # zero-init (paper v2)

  # ------------------------------------------------------------------------------ host

  def host_features(self, tokenizer) -> HostFeatures:
    """``batch -> {"engram/<layer>": int32 [B, T, (N−1)·K]}``: packed-table rows (hash + row offset
    of each head table) of the batch's ``inputs`` at its ``positions`` (under a context edit,
    :mod:`pmem.memory.edit`, of the edited id stream)."""
    v = tokenizer.vocab_size
    if self.pad_id >= v:
      raise ValueError(f"Engram pad_id={self.pad_id} must be a token id in [0, {v})")
    p, v_c = compression(tokenizer) if self.compress else (np.arange(v, dtype=np.int64), v)
    mult = multipliers(self.seed, self.layer, self.max_order, v_c)
    pad, offsets = int(p[self.pad_id]), np.asarray(self.offsets, np.int64)

    def fn(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
      ids = edit.single_ids(batch) if edit.MEMORY_IDS in batch else np.asarray(batch["inputs"])
      z = ngram_hashes(p[ids], batch["positions"], pad, mult, self.sizes)
      return {self.feature: (z + offsets).astype(np.int32)}

    return fn

  # ---------------------------------------------------------------------------- device

  def row_ids(self, ctx: TokenContext) -> Int[Array, "B T H"]:
    if self.feature not in ctx.features:
      raise KeyError(f"Engram layer {self.layer} reads its hashed n-gram rows from ctx.features[{self.feature!r}], "
                     "which Engram.host_features adds to each host batch; this context lacks it")
    return ctx.features[self.feature]

  def gates(self, e: Float[Array, "BT E"], h: Float[Array, "BT D"]) -> Float[Array, "BT M"]:
    """α_m of every token and branch (module docstring)."""
    m, d = self.branches, self.d_model
    if self.gate == "none":
      return jnp.ones((e.shape[0], m), accumulator(e.dtype))
    k = (e @ self.w_k[...].astype(e.dtype).reshape(self.d_mem, m * d)).reshape(-1, m, d) + self.b_k[...].astype(e.dtype)
    s = (_rms(k) * self.scale_k[...] * (_rms(h)[:, None] * self.scale_h[...])).sum(-1) / d ** 0.5
    if self.gate == "sqrt":
      s = jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), 1e-6))
    return jax.nn.sigmoid(s)

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict[str, jax.Array]:
    """The conv tail (:func:`pmem.layers.conv.causal_conv`, dilation N); the n-gram history is the host's
    (``host_history``)."""
    del max_len
    if not self.conv:
      return {}
    return {"tail": jnp.zeros((batch, (KERNEL - 1) * self.max_order, self.branches, self.d_model), dtype)}

  def __call__(self, h: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    dt, (b, t, d), m = self.dtype, h.shape, self.branches
    ids = self.row_ids(ctx)
    diagnostics.usage("engram", ids, self.num_rows)
    e = _rows(self.table, ids).reshape(b * t, self.d_mem).astype(dt)
    v = e @ self.w_v[...].astype(dt) + self.b_v[...].astype(dt)
    a = self.gates(e, h.reshape(b * t, d))
    diagnostics.stat("engram/gate", a.reshape(b, t, m))
    y = (a[..., None].astype(dt) * v[:, None]).reshape(b, t, m, d)  # ṽ_m
    if self.conv:
      c, tail = causal_conv((_rms(y) * self.scale_c[...]).astype(dt), self.w_conv[...], ctx.positions,
                            None if state is None else state["tail"], dilation=self.max_order)
      y = y + jax.nn.silu(c)
      state = None if state is None else {"tail": tail.astype(state["tail"].dtype)}
    y = constrain(y.mean(axis=2).astype(dt), ("batch", "length", "embed"))
    return y if state is None else (y, state)

  def cost(self, seq_len: int) -> accounting.Cost:
    """Each token reads (N−1)·K rows (d_mem numbers); the gate's <k̂, ĥ> and the conv taps count
    as multiply-accumulates, norms and element-wise ops as 0 (pmem.core.accounting)."""
    d, m, c = self.d_model, self.branches, accounting.Cost
    out = accounting.lookup(self.num_rows, self.d_head, rows_read=self.n_tables)
    out = out + accounting.dense(self.d_mem, d) + accounting.vector(d)  # W_V, b_V
    if self.gate != "none":  # W_K^m, b_K^m and two norm scales per branch
      out = out + m * (accounting.dense(self.d_mem, d) + accounting.vector(3 * d)) + c(flops=2 * m * d)
    if self.conv:  # KERNEL taps and one norm scale per channel of each branch
      out = out + m * accounting.vector((KERNEL + 1) * d) + c(flops=2 * KERNEL * m * d)
    return out
