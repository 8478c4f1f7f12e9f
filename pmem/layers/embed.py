"""Token embedding with a bounds check at the boundary (XLA gathers clamp silently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core import accounting
from pmem.layers.init import fan_in_normal


def check_ids(ids: jax.Array, vocab: int) -> None:
  """Raises on ids outside [0, vocab) for concrete arrays; inside jit the data pipeline checks."""
  if isinstance(ids, jax.core.Tracer):
    return
  a = np.asarray(ids)
  lo, hi = int(a.min()), int(a.max())
  if lo < 0 or hi >= vocab:
    raise ValueError(f"token ids must lie in [0, {vocab}); got min {lo}, max {hi}")


class Embed(nnx.Module):

  def __init__(self, vocab: int, d_model: int, *, rngs: nnx.Rngs):
    self.vocab, self.d_model = vocab, d_model
    self.table = nnx.Param(fan_in_normal(rngs.params(), (vocab, d_model), d_model), axes=("vocab", "embed"))

  def __call__(self, ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    check_ids(ids, self.vocab)
    return jnp.take(self.table[...], ids, axis=0)

  def attend(self, h: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Tied output head."""
    b, t, d = h.shape
    return (h.reshape(b * t, d) @ self.table[...].astype(h.dtype).T).reshape(b, t, -1)

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.lookup(self.vocab, self.d_model, rows_read=1)
