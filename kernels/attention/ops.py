"""``attention(q, k, v, segment_ids, positions, window)``: causal self-attention with grouped kv heads
that never attends across packed documents, optionally within a sliding window.

Query ``i`` sees key ``j`` iff ``j <= i``, ``segment_ids[j] == segment_ids[i] > 0`` and, with ``window``,
``positions[i] - positions[j] < window`` (:func:`segment_causal_mask`); scores ``q·k / sqrt(H)``, query head
``n`` reads kv head ``n // (N / K)``. A padding query (segment 0) sees no key: as in
``jax.nn.dot_product_attention``'s masked softmax (every score replaced by the same constant) it averages
``v`` over all ``T`` keys, and its scores get no gradient.

The kernels are a ``jax.custom_vjp`` in the manner of FlashAttention-2 (Dao 2023): the forward saves ``o``
and each row's logsumexp ``lse [B, T, N]`` rather than the ``[B, N, T, T]`` probabilities; the backward
recomputes them, ``P = exp(S − lse)``, and gives (Alg. 2) ``D = rowsum(dO ⊙ O)``, ``dV = Pᵀ dO``,
``dP = dO Vᵀ``, ``dS = P ⊙ (dP − D)``, ``dQ = dS K / sqrt(H)``, ``dK = dSᵀ Q / sqrt(H)`` (summed over each kv
head's group).

| file | forward / backward |
|---|---|
| ``xla.py`` | ``jax.nn.dot_product_attention`` with the boolean mask, autodiff (what ``pmem.layers.attention`` ran before the op, bit for bit) |
| ``native.py`` | C++ through the XLA FFI (``kernels/native/kernels.cc``), float32; the custom_vjp |
| ``pallas_tpu.py`` | ``jax.experimental.pallas.ops.tpu.flash_attention`` (``library.py``: GQA, padding rows); no window |
| ``pallas_gpu.py`` | pmem's FlashAttention-2, a generic ``pl.pallas_call`` lowered through Triton; the custom_vjp; no window |
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import common
from kernels.attention.xla import segment_causal_mask

__all__ = ["IMPLEMENTATIONS", "attention", "segment_causal_mask"]
IMPLEMENTATIONS = ("auto", "xla", "native", "pallas", "pallas_tpu", "pallas_gpu")  # of common.IMPLEMENTATIONS


def _impl(name: str):
  return importlib.import_module(f"kernels.attention.{name}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(name: str, window: int | None, q, k, v, seg, pos):
  return _attention_fwd(name, window, q, k, v, seg, pos)[0]


def _attention_fwd(name, window, q, k, v, seg, pos):
  o, lse = _impl(name).forward(q, k, v, seg, pos, window)
  return o, (q, k, v, seg, pos, o, lse)


def _attention_bwd(name, window, res, do):
  return (*_impl(name).backward(*res, do, window), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
              segment_ids: Int[Array, "B T"], positions: Int[Array, "B T"], window: int | None = None, *,
              implementation: str = "auto") -> Float[Array, "B T N H"]:
  """softmax(q kᵀ / sqrt(H) masked as in the module docstring) v, in q's dtype."""
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
    raise ValueError(f"q [B, T, N, H] {q.shape}, k, v [B, T, K, H] {k.shape} {v.shape} with N % K == 0")
  if segment_ids.shape != (b, t) or positions.shape != (b, t):
    raise ValueError(f"segment_ids {segment_ids.shape} and positions {positions.shape} must be [B, T] = {(b, t)}")
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1 (or None), got {window}")
  name, module = common.select("kernels.attention", implementation, q.dtype, q.shape, window)
  seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
  if hasattr(module, "attention"):  # differentiable as it stands (autodiff or the library kernel's own VJP)
    return module.attention(q, k, v, seg, pos, window)
  return _attention(name, window, q, k, v, seg, pos)
