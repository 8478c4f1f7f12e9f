"""STEM (Sadhukhan et al., ICLR 2026, arXiv 2601.10639): the FFN's up projection replaced by a
per-layer token-indexed table.

    y = W_d (SiLU(W_g x) ⊙ U_ℓ[t]),      U_ℓ ∈ R^{V × d_ff}

``t`` is the raw token id (``ctx.ids``, the ids the input embedding sees); the row is used raw
(no activation, scale or norm). The paper's rejected variants are ablations (``variant=``):
``"replace_gate"``: ``W_d (SiLU(U_ℓ[t]) ⊙ W_u x)`` and ``"additive"`` (STEM†):
``W_d (SiLU(W_g x) ⊙ (W_u x + U_ℓ[t]))``.

Inits follow the reference (``Infini-AI-Lab/STEM``, Lingua): the table is xavier-normal over the
whole ``V × d_ff`` matrix (std sqrt(2 / (V + d_ff))); W_g (and W_u) a normal with std d^-0.5
truncated at ±3σ; W_d std d_ff^-0.5 times the decoder's depth factor ``out_scale``, truncated at
±3σ. ``vocab`` comes from the decoder and ``d_ff`` defaults to the width of the FFN it replaces
(:mod:`pmem.core.mixer`). Place STEM with ``LayerOverride(layers=functools.partial(stem_layers,
schedule=...), channel_mixer=...)`` (the schedule follows ``model.n_layers``); the reference default
replaces every FFN but layer 0 (``"all_but_first"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from pmem.core import accounting
from pmem.core.registry import CHANNEL_MIXERS
from pmem.core.rules import constrain
from pmem.core.variables import MemoryTable
from pmem.memory import diagnostics
from pmem.memory.edit import token_rows
from pmem.core.mixer import TokenContext

VARIANTS = ("stem", "replace_gate", "additive")
SCHEDULES = ("all_but_first", "third", "half", "all")


def trunc_normal(key, shape, std: float, dtype=jnp.float32) -> jax.Array:
  """N(0, std²) truncated at ±3 std (torch ``trunc_normal_(std=s, a=-3s, b=3s)``, Lingua's init)."""
  return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)


def xavier_normal(key, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
  """torch ``xavier_normal_``: N(0, 2 / (fan_in + fan_out)), untruncated."""
  return (2.0 / (shape[0] + shape[1])) ** 0.5 * jax.random.normal(key, shape, dtype)


def stem_layers(n_layers: int, schedule: str | Sequence[int] = "all_but_first") -> tuple[int, ...]:
  """Indices of the layers whose FFN STEM replaces.

  ``"all_but_first"``: 1..L-1 (the reference default); ``"all"``; ``"half"`` / ``"third"``: every
  2nd / 3rd layer at uniform intervals, ending on the last of each group (``i % k == k - 1``:
  L=8 half gives 1, 3, 5, 7 as the reference README; third gives 2, 5); or explicit indices."""
  if isinstance(schedule, str):
    if schedule == "all_but_first":
      out = tuple(range(1, n_layers))
    elif schedule == "all":
      out = tuple(range(n_layers))
    elif schedule in ("half", "third"):
      k = 2 if schedule == "half" else 3
      out = tuple(i for i in range(n_layers) if i % k == k - 1)
    else:
      raise ValueError(f"unknown STEM layer schedule {schedule!r}; one of {SCHEDULES} or a tuple of layer indices")
  else:
    out = tuple(sorted({int(i) for i in schedule}))
    if any(not 0 <= i < n_layers for i in out):
      raise ValueError(f"STEM layers {tuple(schedule)} outside 0..{n_layers - 1}")
  if not out:
    raise ValueError(f"STEM schedule {schedule!r} selects no layer of {n_layers}")
  return out


@CHANNEL_MIXERS.register("stem")
class STEM(nnx.Module):
  """y = W_d (SiLU(W_g x) ⊙ U[t]) (``variant="stem"``); see the module docstring for the others."""

  def __init__(self, d_model: int, vocab: int, d_ff: int | None = None, variant: str = "stem",
               out_scale: float = 1.0, dtype: str = "float32", *, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f"unknown STEM variant {variant!r}; one of {VARIANTS}")
    if d_ff is None:
      raise ValueError("STEM needs d_ff: the model's channel mixer has no d_ff to inherit; give STEM its own")
    k = rngs.params
    self.d_model, self.d_ff, self.vocab, self.variant, self.dtype = d_model, d_ff, vocab, variant, jnp.dtype(dtype)
    # index="inputs": rows are read at the batch's input token ids (known before the forward).
    self.table = MemoryTable(xavier_normal(k(), (vocab, d_ff)), axes=("table_rows", "mlp"), index="inputs")
    if variant in ("stem", "additive"):
      self.w_gate = nnx.Param(trunc_normal(k(), (d_model, d_ff), d_model ** -0.5), axes=("embed", "mlp"))
    if variant in ("replace_gate", "additive"):
      self.w_up = nnx.Param(trunc_normal(k(), (d_model, d_ff), d_model ** -0.5), axes=("embed", "mlp"))
    self.w_down = nnx.Param(trunc_normal(k(), (d_ff, d_model), out_scale * d_ff ** -0.5), axes=("mlp", "embed"))

  def __call__(self, x: Float[Array, "B T D"], ctx: TokenContext) -> Float[Array, "B T D"]:
    dt, (b, t, d) = self.dtype, x.shape
    x2 = x.astype(dt).reshape(b * t, d)  # 2-D matmuls, as SwiGLU
    diagnostics.usage("stem", ctx.ids, self.vocab)
    u = token_rows(self.table, ctx).reshape(b * t, self.d_ff).astype(dt)  # U[t] (or an edit's rows)
    if self.variant == "stem":
      h = jax.nn.silu(x2 @ self.w_gate[...].astype(dt)) * u
    elif self.variant == "replace_gate":
      h = jax.nn.silu(u) * (x2 @ self.w_up[...].astype(dt))
    else:  # additive (STEM†)
      h = jax.nn.silu(x2 @ self.w_gate[...].astype(dt)) * (x2 @ self.w_up[...].astype(dt) + u)
    h = constrain(h.reshape(b, t, -1), ("batch", "length", "act_mlp"))
    y = h.reshape(b * t, -1) @ self.w_down[...].astype(dt)
    return constrain(y.reshape(b, t, d), ("batch", "length", "embed"))

  def cost(self, seq_len: int) -> accounting.Cost:
    n_dense = 3 if self.variant == "additive" else 2
    return n_dense * accounting.dense(self.d_model, self.d_ff) + accounting.lookup(self.vocab, self.d_ff, rows_read=1)
