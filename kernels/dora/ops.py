"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") pieces: the factored weight norm,
the stable compose of the layer's output and the merged weights for export.

A DoRA linear layer with frozen ``W [d_in, d_out]`` (pmem's [in, out] layout), LoRA factors
``A [d_in, r]``, ``B [r, d_out]``, scale ``s = alpha / r`` and magnitude ``m [d_out]`` computes (Eq. 5)

    y = g ⊙ (x W + s·x A B),   g = m / ‖W + s·A B‖_c,

where ``‖·‖_c`` is the norm of each output feature's column, over d_in. As a delta on the base output:
``y = base + dora_compose(base, lora, g, s)`` with ``base = x W`` and ``lora = x A B``.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from kernels import common

CHUNK = 512


def _impl(name: str):
  return importlib.import_module(f"kernels.dora.{name}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _norm(name: str, s: float, chunk: int, w, a, b):
  return _impl(name).norm_forward(w, a, b, s, chunk)[0]


def _norm_fwd(name, s, chunk, w, a, b):
  """The backward runs only the gradients of perturbed inputs (a frozen W gets no dW pass)."""
  norm, p, g = _impl(name).norm_forward(w.value, a.value, b.value, s, chunk)
  return norm, (w.value, a.value, b.value, p, g, norm, (w.perturbed, a.perturbed, b.perturbed))


def _norm_bwd(name, s, chunk, res, ct):
  w, a, b, p, g, norm, want = res
  if isinstance(ct, SymbolicZero):
    return None, None, None
  return _impl(name).norm_backward(ct, w, a, b, p, g, norm, s, chunk, want)


_norm.defvjp(_norm_fwd, _norm_bwd, symbolic_zeros=True)


def _check_factors(w, a, b) -> None:
  (d_in, d_out), r = w.shape, a.shape[-1]
  if a.shape != (d_in, r) or b.shape != (r, d_out):
    raise ValueError(f"w [d_in, d_out], a [d_in, r], b [r, d_out] disagree: {w.shape}, {a.shape}, {b.shape}")


def dora_norm(w: Float[Array, "d_in d_out"], a: Float[Array, "d_in r"], b: Float[Array, "r d_out"], s: float, *,
              chunk: int | None = None, implementation: str = "auto") -> Float[Array, " d_out"]:
  """``‖W + s·A B‖`` per output feature (column j: the norm over the d_in rows), float32 (float64 for
  float64 inputs), without forming A B:

      ‖W_j + s(AB)_j‖² = Σ_i W_ij² + 2s·Σ_k B_kj (AᵀW)_kj + s²·Σ_k B_kj (AᵀA B)_kj,

  AᵀW and AᵀA accumulated in float32 over chunks of ``chunk`` rows of d_in (each chunk cast and, in
  XLA, copied on its own); the square clamped at 0 before the sqrt. Working memory beyond the inputs,
  forward and backward: O(r·d_out + r²), plus O(chunk·d_out) when chunked. ``chunk=None``: one pass
  when W and A are float32 already (no copy), else chunks of ``CHUNK`` rows (a bf16 W is never cast whole).

  Differentiable in w, a and b (a ``jax.custom_vjp``: the same chunked passes; zero gradient where the
  norm is 0). DoRA §4.3 — and PEFT's ``DoraLinearLayer`` — treat the norm as a constant in the
  backward: take ``m / jax.lax.stop_gradient(dora_norm(...))`` for those semantics. ``s`` is static.
  Only XLA implements it (``implementation`` is ``"auto"`` or ``"xla"``)."""
  _check_factors(w, a, b)
  if chunk is None:
    chunk = w.shape[0] if w.dtype == a.dtype == common.accumulator(w.dtype, a.dtype, b.dtype) else CHUNK
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  name = common.select("kernels.dora", implementation, "norm", w.shape[1], w.dtype)[0]
  return _norm(name, float(s), int(chunk), w, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _compose(name: str, s: float, base, lora, g):
  return _impl(name).compose_forward(base, lora, g, s)


def _compose_fwd(name, s, base, lora, g):
  return _compose(name, s, base, lora, g), (base, lora, g)


def _compose_bwd(name, s, res, dout):
  base, lora, g = res
  dbase, dlora, dg = _impl(name).compose_backward(dout, base, lora, g, s)
  return dbase.astype(base.dtype), dlora.astype(lora.dtype), dg.astype(g.dtype)


_compose.defvjp(_compose_fwd, _compose_bwd)


def dora_compose(base: Float[Array, "... D"], lora: Float[Array, "... D"], g: Float[Array, " D"], s: float, *,
                 implementation: str = "auto") -> Float[Array, "... D"]:
  """The DoRA output's delta on the base output: ``y = base + dora_compose(base, lora, g, s)`` with

      dora_compose = (g − 1) ⊙ base + g ⊙ (s·lora)     (= g ⊙ (base + s·lora) − base),

  ``base = x W``, ``lora = x A B``, ``g = m / ‖W + sAB‖``. Computed in float32 (float64 for float64
  inputs), base's dtype out; at g ≈ 1 it keeps its relative precision where the naive
  ``g ⊙ (base + s·lora) − base`` cancels. A ``jax.custom_vjp``: d base = (g − 1)·dout,
  d lora = g·s·dout, dg = Σ over the leading axes of dout ⊙ (base + s·lora) (per-block partial sums,
  no atomics). ``s`` is static."""
  if base.shape != lora.shape:
    raise ValueError(f"base {base.shape} and lora {lora.shape} must have the same shape")
  d = base.shape[-1]
  if g.shape != (d,):
    raise ValueError(f"g must have shape ({d},), got {g.shape}")
  name = common.select("kernels.dora", implementation, "compose", d, jnp.result_type(base, lora))[0]
  out = _compose(name, float(s), base.reshape(-1, d), lora.reshape(-1, d), g)
  return out.reshape(base.shape)


def _merged(w, a, b, s: float):
  c = common.accumulator(w.dtype, a.dtype, b.dtype)
  return w.astype(c) + s * jnp.matmul(a.astype(c), b.astype(c), precision=jax.lax.Precision.HIGHEST)


def lora_merge(w: Float[Array, "d_in d_out"], a: Float[Array, "d_in r"], b: Float[Array, "r d_out"],
               s: float) -> Float[Array, "d_in d_out"]:
  """``W + s·A B`` in float32, w's dtype out: the LoRA layer's weight for export."""
  _check_factors(w, a, b)
  return _merged(w, a, b, s).astype(w.dtype)


def dora_merge(w: Float[Array, "d_in d_out"], a: Float[Array, "d_in r"], b: Float[Array, "r d_out"],
               m: Float[Array, " d_out"], s: float) -> Float[Array, "d_in d_out"]:
  """``W' = (m / ‖W + s·A B‖_c) ⊙ (W + s·A B)``, each output column scaled (so ``x W'`` is the DoRA layer's
  y): in float32, w's dtype out. Forms W + sAB (the result's size) and takes its column norms directly."""
  _check_factors(w, a, b)
  if m.shape != (w.shape[1],):
    raise ValueError(f"m must have shape ({w.shape[1]},), got {m.shape}")
  v = _merged(w, a, b, s)
  return (v * (m.astype(v.dtype) / jnp.linalg.norm(v, axis=0))).astype(w.dtype)
