"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), with an explicit seed."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampling:
  """``temperature=0``: greedy (argmax); else a draw from ``softmax(logits / temperature)``
  restricted to the ``top_k`` most likely tokens (0: all) and then to the smallest set whose
  probability reaches ``top_p`` (1: all). ``seed`` fixes every draw of a generation."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not 0 <= self.temperature < math.inf:  # nan and inf too
      raise ValueError(f"temperature must be >= 0 (0: greedy) and finite, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def filtered(logits: Float[Array, "B V"], s: Sampling) -> Float[Array, "B V"]:
  """``logits / temperature`` with the tokens outside top-k / top-p set to -inf."""
  z = logits.astype(jnp.float32) / s.temperature
  if s.top_k and s.top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, s.top_k)[0][:, -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  if s.top_p < 1:
    order = jnp.argsort(-z, axis=-1)
    p = jax.nn.softmax(jnp.take_along_axis(z, order, -1), axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability of the more likely tokens
    keep = jnp.zeros_like(z, bool).at[jnp.arange(z.shape[0])[:, None], order].set(before < s.top_p)
    z = jnp.where(keep, z, -jnp.inf)
  return z


def sample(logits: Float[Array, "B V"], key: jax.Array, s: Sampling) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
  """The next token of each row and its log-probability under the model (``log_softmax(logits)``,
  before temperature and filtering)."""
  if s.temperature == 0:
    tok = jnp.argmax(logits, axis=-1)
  else:
    tok = jax.random.categorical(key, filtered(logits, s), axis=-1)
  tok = tok.astype(jnp.int32)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tok[:, None], -1)[:, 0]
  return tok, lp
