"""XLA reference for the DoRA ops: the factored column norm (chunked over d_in) and its backward, and the
stable compose. The elementwise compose math (:func:`delta`, :func:`grads`) is shared with the Pallas
kernels, which call it on the blocks they load.

Layout: ``w [d_in, d_out]``, ``a [d_in, r]``, ``b [r, d_out]`` (pmem keeps weights [in, out]); the
norm of output feature j is that of column j, ``‖W[:, j] + s·(A B)[:, j]‖`` over d_in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.common import accumulator

_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # no TF32 / bf16 passes on GPU / TPU


def check(op: str, d: int, dtype) -> None:
  del op, d, dtype


def over_chunks(n: int, chunk: int, body, carry):
  """``body(start, size, carry)`` over rows ``[0, n)`` in chunks of ``chunk`` (a ``fori_loop`` over the full
  chunks, then the remainder): nothing is padded, so no copy of an [n, ...] operand is made."""
  full = n // chunk
  if full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * chunk, chunk, c), carry)
  return body(full * chunk, n % chunk, carry) if n % chunk else carry


def _rows(x, start, size: int, dtype):
  return jax.lax.dynamic_slice_in_dim(x, start, size).astype(dtype)


def norm_forward(w, a, b, s: float, chunk: int):
  """(norm [d_out], P = AᵀW [r, d_out], G = AᵀA [r, r]) with, per output column j,

      ‖W_j + s(AB)_j‖² = Σ_i W_ij² + 2s·Σ_k B_kj P_kj + s²·Σ_k B_kj (G B)_kj,

  P, G and Σ W² accumulated over chunks of d_in rows in float32 (each chunk cast on its own: a bf16 W
  is never copied whole to float32); the square is clamped at 0 before the sqrt. Working memory
  O(chunk·d_out + r·d_out + r²); A·B is never formed."""
  c = accumulator(w.dtype, a.dtype, b.dtype)
  r, d_out = b.shape

  def body(start, size, carry):
    sq, p, g = carry
    wc, ac = _rows(w, start, size, c), _rows(a, start, size, c)
    return sq + jnp.sum(wc * wc, axis=0), p + _dot(ac.T, wc), g + _dot(ac.T, ac)

  zeros = (jnp.zeros((d_out,), c), jnp.zeros((r, d_out), c), jnp.zeros((r, r), c))
  sq, p, g = over_chunks(w.shape[0], chunk, body, zeros)
  b = b.astype(c)
  q = sq + (2 * s) * jnp.sum(b * p, axis=0) + (s * s) * jnp.sum(b * _dot(g, b), axis=0)
  return jnp.sqrt(jnp.maximum(q, 0)), p, g


def norm_backward(ct, w, a, b, p, g, norm, s: float, chunk: int, want: tuple[bool, bool, bool]):
  """(dW, dA, dB) of :func:`norm_forward`'s norm for its cotangent ``ct``, each None unless ``want``ed.

  With u = ct / (2‖·‖) (0 where the norm is 0) the gradients of the squared norm are
  dB = 2s·u ⊙ (P + s·G B), dA = 2s·W (B ⊙ u)ᵀ + 2s²·A (B ⊙ u) Bᵀ and dW = 2 (W + s·A B) ⊙ u; dA and dW
  go over the same chunks of d_in rows as the forward (dW forms A B one chunk at a time)."""
  want_w, want_a, want_b = want
  c = p.dtype
  u = jnp.where(norm > 0, ct.astype(c) / (2 * norm), 0)
  b32 = b.astype(c)
  db = ((2 * s) * u * (p + s * _dot(g, b32))).astype(b.dtype) if want_b else None
  if not (want_w or want_a):
    return None, None, db
  bu = b32 * u
  bu_t, m = bu.T, _dot(bu, b32.T)

  def body(start, size, out):
    dw, da = out
    wc, ac = _rows(w, start, size, c), _rows(a, start, size, c)
    if want_a:
      da = jax.lax.dynamic_update_slice_in_dim(da, ((2 * s) * _dot(wc, bu_t) + (2 * s * s) * _dot(ac, m)
                                                    ).astype(a.dtype), start, 0)
    if want_w:
      dw = jax.lax.dynamic_update_slice_in_dim(dw, (2 * (wc + s * _dot(ac, b32)) * u).astype(w.dtype), start, 0)
    return dw, da

  init = (jnp.zeros(w.shape, w.dtype) if want_w else None, jnp.zeros(a.shape, a.dtype) if want_a else None)
  dw, da = over_chunks(w.shape[0], chunk, body, init)
  return dw, da, db


def delta(base, lora, g, s: float):
  """``(g − 1)·base + g·(s·lora)`` on arrays already in the compute dtype: g − 1 is exact near 1, so
  nothing of size |base| is added and subtracted again (the naive ``g·(base + s·lora) − base`` is)."""
  return (g - 1) * base + g * (s * lora)


def grads(dout, base, lora, g, s: float):
  """(d base, d lora, the per-element terms of dg) of :func:`delta` for its cotangent ``dout``."""
  return (g - 1) * dout, (g * s) * dout, dout * (base + s * lora)


def compose_forward(base, lora, g, s: float):
  """:func:`delta` for base, lora [N, D] and g [D] in float32 (float64 for float64 inputs), base's dtype out."""
  c = accumulator(base.dtype, lora.dtype, g.dtype)
  return delta(base.astype(c), lora.astype(c), g.astype(c), s).astype(base.dtype)


def compose_backward(dout, base, lora, g, s: float):
  """(d base, d lora, dg) for cotangent ``dout`` [N, D]; dg is a float32 sum over the N rows."""
  c = accumulator(dout.dtype, base.dtype, lora.dtype, g.dtype)
  dbase, dlora, terms = grads(dout.astype(c), base.astype(c), lora.astype(c), g.astype(c), s)
  return dbase, dlora, jnp.sum(terms, axis=0)
