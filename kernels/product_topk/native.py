"""Native CPU product top-k (``kernels/native/kernels.cc``, ``pmem_topk_pairs``): per row, each
half's k best and then the candidate sums' k best, each by a sampled threshold (about 1.5k keys
pass) and a branch-free rank count of those; rows split across XLA's CPU thread pool. Float32
scores, same order and ties as ``xla.py``.
The scores' gradient (a scatter-add along each row) is ``pmem_row_scatter``, in XLA's order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import native
from kernels.common import Unavailable


def check(n: int, dtype) -> None:
  del n
  if jnp.dtype(dtype) != jnp.float32:
    raise Unavailable(f"native product_topk takes float32 scores, got {jnp.dtype(dtype).name}")
  if (reason := native.available()) is not None:
    raise Unavailable(reason)


def topk_slots(s1, s2, k: int, a, b):
  out = jax.ShapeDtypeStruct((s1.shape[0], k), jnp.int32)
  return native.call("pmem_topk_pairs", out, s1, s2, jnp.asarray(a), jnp.asarray(b))


@jax.custom_vjp
def take(s: Float[Array, "R n"], i: Int[Array, "R k"]) -> Float[Array, "R k"]:
  """``take_along_axis(s, i, -1)`` whose backward is the native row scatter-add."""
  return jnp.take_along_axis(s, i, -1)


def _take_fwd(s, i):
  return take(s, i), (i, s.shape[1])


def _take_bwd(res, g):
  i, n = res
  return native.call("pmem_row_scatter", jax.ShapeDtypeStruct((i.shape[0], n), jnp.float32), i, g), None


take.defvjp(_take_fwd, _take_bwd)
