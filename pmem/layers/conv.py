"""The causal depthwise conv with a decode tail: :func:`causal_conv` (Engram's dilated conv,
``pmem/memory/engram.py``) and :class:`ShortConv`, its module (the linear-recurrence mixers' and
Mamba2's short conv, ``pmem/layers/linear_recurrence.py``, ``pmem/layers/mamba2.py``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core import accounting


def causal_conv(x: Float[Array, "B T *C"], w: Float[Array, " W *C"], positions: Int[Array, "B T"],
                tail: Float[Array, "B L *C"] | None = None, dilation: int = 1
                ) -> tuple[Float[Array, "B T *C"], Float[Array, "B L *C"]]:
  """``(y, tail')``: ``y_t = Σ_{j<W} w_j ⊙ x_{t−j·dilation}`` over ``j·dilation <= position_t`` (no tap
  across a document start); ``tail``: the ``L = (W − 1)·dilation`` inputs before ``x`` (decode state;
  zeros for whole documents), ``tail'`` the last ``L`` of ``tail ++ x``."""
  (b, t, *c), lead = x.shape, (w.shape[0] - 1) * dilation
  w = w.astype(x.dtype)
  full = jnp.concatenate([jnp.zeros((b, lead, *c), x.dtype) if tail is None else tail.astype(x.dtype), x], 1)
  inside = lambda lag: jnp.expand_dims(positions >= lag, tuple(range(2, x.ndim)))  # noqa: E731
  y = sum(jnp.where(inside(j * dilation), full[:, lead - j * dilation:lead - j * dilation + t], 0) * w[j]
          for j in range(w.shape[0]))
  return y, full[:, t:]


class ShortConv(nnx.Module):
  """:func:`causal_conv` of ``channels`` over ``width`` taps (no dilation), N(0, 1/width) weights."""

  def __init__(self, channels: int, width: int = 4, *, rngs: nnx.Rngs):
    self.channels, self.width = channels, width
    self.w = nnx.Param(jax.random.normal(rngs.params(), (width, channels)) / math.sqrt(width), axes=(None, None))

  def __call__(self, x: Float[Array, "B T C"], positions: Int[Array, "B T"],
               tail: Float[Array, "B L C"] | None = None) -> tuple[Float[Array, "B T C"], Float[Array, "B L C"]]:
    """``(y, tail')`` (:func:`causal_conv`, ``L = W − 1``)."""
    return causal_conv(x, self.w[...], positions, tail)

  def cost(self, seq_len: int) -> accounting.Cost:
    n = self.width * self.channels
    return accounting.Cost(params=n, active_params=n, flops=2 * n, bytes_read=4 * n)
