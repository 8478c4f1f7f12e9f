"""Mela's Hierarchical Memory Module (HMM; MusubiAI 2026, arXiv 2605.10537) as a sequence mixer, ``mela``, and
MemStack as a layer schedule (configs/mela.py).

The paper's equations were not retrieved (shared/reference/modules.md §9): what it states is two neural-memory
sub-modules with different update frequencies, a low-frequency one for gist-level and a high-frequency one for
fine-grained episodic detail, whose outputs are mixed depending on the context, and MemStack, which feeds
different memory levels into different early decoder layers without adding tokens. What is implemented:

**Levels.** Two Titans memories (:class:`pmem.memory.titans.NeuralMemory`, used whole through its ``__call__``:
its projections, short convs, gates, MLP memory, head norm, output gate and projection), both reading the layer's
input ``x``. Their update frequencies are their memory chunks: with titans.py's semantics a memory of chunk ``b``
takes every token's gradient at the weights of its chunk's start (Titans §3.2, mini-batch gradient descent), so
it re-linearises once per ``b`` positions; the fast level has ``chunk`` (4), the slow one ``chunk · ratio`` (32).

**Mix** (the "reconstruction"), per channel of the output, from the same input:

    g_t = σ(x_t W_mix + b_mix) ∈ (0, 1)^D
    y_t = g_t ⊙ y^fast_t + (1 − g_t) ⊙ y^slow_t

Per channel rather than per head because each memory's per-head reads leave its ``__call__`` already projected to
``D`` by its own ``W_o`` (a per-head mix would reach into titans.py's internals); two products rather than
``y^slow + g ⊙ (y^fast − y^slow)`` so that ``g = 1`` (``b_mix = +∞``) gives ``y^fast`` and ``g = 0`` gives
``y^slow`` bit for bit. ``levels=1``: the fast level alone, no mix: a plain NeuralMemory (the one-frequency
ablation).

**MemStack** (configs/mela.py, ``mela_tiny``): layer 0's sequence mixer is the slow level alone (a NeuralMemory
of chunk 32: gist), layer 1's the fast level alone (chunk 4: detail), every later layer the mixed HMM. That is the
paper's "different granularity levels into different early layers, without adding tokens" read in this decoder,
whose layers talk only through the residual stream: each early layer gets one level's read of its own input added
to the stream (no memory tokens in any context). A reading with one HMM whose two levels' outputs are sent to
different layers would need a cross-layer channel from hidden states (``model.shared`` reads token ids); not done.

Decode state ``{"fast": …, "slow": …}``: each level's NeuralMemory state, constant in ``max_len``."""

from __future__ import annotations

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
from pmem.layers.init import fan_in_normal
from pmem.memory.titans import NeuralMemory


@SEQUENCE_MIXERS.register("mela")
class HierarchicalMemory(nnx.Module):
  """The HMM (module docstring): ``levels`` 2: a fast NeuralMemory of ``chunk`` and a slow one of ``chunk ·
  ratio``, mixed per channel by ``σ(x W_mix + b_mix)``; ``levels`` 1: the fast one alone. ``memory``: the levels'
  factory (their other knobs: a ``fdl.Partial(NeuralMemory, depth=…, …)``)."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, levels: int = 2, chunk: int = 4,
               ratio: int = 8, memory: Callable[..., NeuralMemory] = NeuralMemory, out_scale: float = 1.0,
               dtype: str = "float32", *, rngs: nnx.Rngs):
    if levels not in (1, 2):
      raise ValueError(f"mela: levels must be 1 (one frequency) or 2 (fast and slow), got {levels}")
    if levels == 2 and ratio < 2:
      raise ValueError(f"mela: ratio (the slow level's chunk over the fast one's) must be >= 2, got {ratio}")
    self.d_model, self.levels, self.dtype = d_model, levels, jnp.dtype(dtype)
    level = lambda c: memory(d_model=d_model, n_heads=n_heads, head_dim=head_dim, chunk=c,  # noqa: E731
                             out_scale=out_scale, dtype=dtype, rngs=rngs)
    self.fast = level(chunk)
    if levels == 2:
      self.slow = level(chunk * ratio)
      self.w_mix = nnx.Param(fan_in_normal(rngs.params(), (d_model, d_model), d_model), axes=("embed", None))
      self.b_mix = nnx.Param(jnp.zeros((d_model,)), axes=(None,))

  def mems(self) -> dict[str, NeuralMemory]:
    return {"fast": self.fast, **({"slow": self.slow} if self.levels == 2 else {})}

  def init_state(self, batch: int, max_len: int, dtype: str = "float32") -> dict:
    return {n: m.init_state(batch, max_len, dtype) for n, m in self.mems().items()}

  def mix(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    """``g = σ(x W_mix + b_mix)``, the fast level's weight per token and channel (float32 or float64)."""
    dt = self.dtype
    z = widen(x.astype(dt) @ self.w_mix[...].astype(dt)).astype(accumulator(dt)) + self.b_mix[...]
    return jax.nn.sigmoid(z)

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext, state: dict | None = None):
    if state is None:
      ys, new = {n: m(x, ctx) for n, m in self.mems().items()}, None
    else:
      out = {n: m(x, ctx, state[n]) for n, m in self.mems().items()}
      ys, new = {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}
    if self.levels == 1:
      y = ys["fast"]
    else:
      g = self.mix(x)
      y = (g * widen(ys["fast"]) + (1 - g) * widen(ys["slow"])).astype(self.dtype)
      y = constrain(y, ("batch", "length", "embed"))
    return y if state is None else (y, new)

  def cost(self, seq_len: int) -> accounting.Cost:
    c = sum((m.cost(seq_len) for m in self.mems().values()), accounting.Cost())
    if self.levels == 2:
      c = c + accounting.dense(self.d_model, self.d_model) + accounting.vector(self.d_model)
    return c
