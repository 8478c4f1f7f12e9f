"""``product_topk(s1, s2, k)``: the k largest ``s1[i] + s2[j]`` over all ``n²`` pairs and their slots
``i·n + j`` (product-key memory retrieval, Lample et al. 2019 §3.2).

Top-k of each half, then the exact top-k of the candidate sums. With both halves sorted, the pair of
ranks (a, b) scores at most each of the (a+1)(b+1) pairs (a' ≤ a, b' ≤ b), so only the pairs with
(a+1)(b+1) ≤ k can reach the top k: those ~k·ln k sums are formed (119 of 1024 for k = 32).

An implementation gives the slots (sorted by score, ties to the lower rank pair, as ``lax.top_k``)
and ``take`` (``take_along_axis`` with its gradient); the scores are re-read from ``s1``/``s2`` here,
so they are differentiable in both and equal bit for bit across implementations.
"""

from __future__ import annotations

import importlib

import jax
import numpy as np
from jaxtyping import Array, Float, Int

from kernels import common


def candidate_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Ranks (a, b) in the two sorted top-k lists whose sum can be among the k best: (a+1)(b+1) ≤ k."""
  r = np.arange(1, k + 1)
  return np.nonzero(r[:, None] * r[None, :] <= k)


def product_topk(s1: Float[Array, "... n"], s2: Float[Array, "... n"], k: int, *,
                 implementation: str = "auto") -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
  """(scores, slots), best first: the top-k of ``s1[..., i] + s2[..., j]`` and ``i·n + j``."""
  if s1.shape != s2.shape:
    raise ValueError(f"s1 {s1.shape} and s2 {s2.shape} must have the same shape")
  n = s1.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"k must lie in 1..{n}, got {k}")
  name = common.select("kernels.product_topk", implementation, n, s1.dtype)[0]
  impl = importlib.import_module(f"kernels.product_topk.{name}")
  lead, s1, s2 = s1.shape[:-1], s1.reshape(-1, n), s2.reshape(-1, n)
  nograd = jax.lax.stop_gradient  # the slots are integers
  slots = impl.topk_slots(nograd(s1), nograd(s2), k, *map(np.int32, candidate_pairs(k)))
  scores = impl.take(s1, slots // n) + impl.take(s2, slots % n)
  return scores.reshape(*lead, k), slots.reshape(*lead, k)
