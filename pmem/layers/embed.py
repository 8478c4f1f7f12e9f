"""Token embedding with a bounds check at the boundary (XLA gathers read NaN rows for ids past the
table and wrap negative ones to the end)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from pmem.core import accounting
from pmem.layers.init import fan_in_normal

ID_CHECKS = ("error", "trusted")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("pmem_ids_check", default="error")


@contextlib.contextmanager
def trusted_ids() -> Iterator[None]:
  """Scope whose traced token ids :func:`check_ids` leaves unchecked: for callers that checked them
  on the host (the trainer's steps; ``Trainer.to_device``). Enter it inside the traced function, as
  a jit trace made in it is reused outside it."""
  token = _MODE.set("trusted")
  try:
    yield
  finally:
    _MODE.reset(token)


def _raise_outside(lo, hi, *, n: int, what: str) -> None:
  lo, hi = int(np.min(lo)), int(np.max(hi))  # np.min/max: a vmapped check passes arrays
  if lo < 0 or hi >= n:
    raise ValueError(f"{what} must lie in [0, {n}); got min {lo}, max {hi}")


def check_ids(ids: jax.Array, n: int, mode: str | None = None, what: str = "token ids") -> None:
  """Refuses ids outside ``[0, n)`` with a one-line ValueError.

  Concrete ids are checked here, in either mode. Traced ids (under ``jit``) with ``mode="error"``
  are checked when the computation runs: a host callback, called only for bad ids, raises the
  ValueError, which the caller of the jitted function receives as a ``jax.errors.JaxRuntimeError``
  whose message ends with that line. ``mode="trusted"`` leaves traced ids unchecked; ``None``: the
  scope's mode ("error", or "trusted" inside :func:`trusted_ids`)."""
  mode = _MODE.get() if mode is None else mode
  if mode not in ID_CHECKS:
    raise ValueError(f"ids_check must be one of {', '.join(ID_CHECKS)}; got {mode!r}")
  check = functools.partial(_raise_outside, n=n, what=what)
  if not isinstance(ids, jax.core.Tracer):
    if np.size(ids):
      a = np.asarray(ids)
      check(a.min(), a.max())
  elif mode == "error" and ids.size:
    lo, hi = jnp.min(ids), jnp.max(ids)
    jax.lax.cond((lo < 0) | (hi >= n), lambda: jax.debug.callback(check, lo, hi), lambda: None)


class Embed(nnx.Module):

  def __init__(self, vocab: int, d_model: int, *, rngs: nnx.Rngs):
    self.vocab, self.d_model = vocab, d_model
    self.table = nnx.Param(fan_in_normal(rngs.params(), (vocab, d_model), d_model), axes=("vocab", "embed"))

  def __call__(self, ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Rows of ``ids``; ids outside ``[0, vocab)`` are an error, also under ``jit`` (:func:`check_ids`)."""
    check_ids(ids, self.vocab)
    return jnp.take(self.table[...], ids, axis=0)

  def cost(self, seq_len: int) -> accounting.Cost:
    return accounting.lookup(self.vocab, self.d_model, rows_read=1)
