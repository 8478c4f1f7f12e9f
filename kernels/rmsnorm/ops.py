"""Fused residual add + RMSNorm with a one-pass backward (custom_vjp; rstd saved by the forward)."""

from __future__ import annotations

import functools
import importlib

import jax
from jaxtyping import Array, Float

from kernels import common


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(name: str, eps: float, x, r, scale):
  return _fused_fwd(name, eps, x, r, scale)[0]


def _fused_fwd(name, eps, x, r, scale):
  normed, y, rstd = importlib.import_module(f"kernels.rmsnorm.{name}").forward(x, r, scale, eps)
  return (normed, y), (y, scale, rstd)


def _fused_bwd(name, eps, res, cts):
  y, scale, rstd = res
  dx, dscale = importlib.import_module(f"kernels.rmsnorm.{name}").backward(*cts, y, scale, rstd)
  return dx, dx, dscale.astype(scale.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_add_rmsnorm(x: Float[Array, "... D"], residual: Float[Array, "... D"], scale: Float[Array, " D"],
                      eps: float = 1e-6, *, implementation: str = "auto"
                      ) -> tuple[Float[Array, "... D"], Float[Array, "... D"]]:
  """``(normed, new_residual)`` with ``new_residual = x + residual`` (in x's dtype) and
  ``normed = (scale * new_residual * rsqrt(mean(new_residual**2) + eps)).astype(x.dtype)``,
  statistics in float32 (HF Llama / ``pmem.layers.norms.RMSNorm``)."""
  if x.shape != residual.shape or x.dtype != residual.dtype:
    raise ValueError(f"x {x.shape} {x.dtype} and residual {residual.shape} {residual.dtype} must match")
  d = x.shape[-1]
  if scale.shape != (d,):
    raise ValueError(f"scale must have shape ({d},), got {scale.shape}")
  name = common.select("kernels.rmsnorm", implementation, d, x.dtype)[0]
  normed, y = _fused(name, float(eps), x.reshape(-1, d), residual.reshape(-1, d), scale)
  return normed.reshape(x.shape), y.reshape(x.shape)
