"""Pallas Mosaic GPU fused residual-add + RMSNorm (``plgpu.kernel``): a program per block of ``ROWS``
rows, one row at a time in registers (warpgroup-strided layout); the backward accumulates a float32
partial dscale per program in registers and writes it once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import common

f32 = jnp.float32
ROWS = 16


def check(d: int, dtype) -> None:
  if d % 128 or d > 16384:
    raise common.Unavailable(f"pallas_gpu rmsnorm needs D divisible by 128 and <= 16384, got {d}")


def _rows(n, body, init):
  """Runs ``body(i, carry)`` over this program's rows ``i``; returns (program id, carry)."""
  b = jax.lax.axis_index("b")
  return b, jax.lax.fori_loop(0, jnp.minimum(ROWS, n - b * ROWS), lambda j, c: body(b * ROWS + j, c), init)


def _forward_body(n, d, eps, x_ref, r_ref, s_ref, o_ref, y_ref, rstd_ref):
  def row(i, _):
    y = (x_ref[i].astype(f32) + r_ref[i].astype(f32)).astype(y_ref.dtype)
    y_ref[i] = y
    y = y.astype(f32)
    rstd = jax.lax.rsqrt(jnp.sum(y * y) / d + eps)
    rstd_ref[i] = rstd
    o_ref[i] = (s_ref[...].astype(f32) * (y * rstd)).astype(o_ref.dtype)
  _rows(n, row, None)


def _backward_body(n, d, g_ref, gy_ref, y_ref, s_ref, rstd_ref, dx_ref, ds_ref):
  def row(i, ds):
    g, y, rstd = g_ref[i].astype(f32), y_ref[i].astype(f32), rstd_ref[i]
    u = g * s_ref[...].astype(f32)
    dx = rstd * (u - y * (rstd * rstd) * (jnp.sum(u * y) / d)) + gy_ref[i].astype(f32)
    dx_ref[i] = dx.astype(dx_ref.dtype)
    return ds + g * (y * rstd)
  b, ds = _rows(n, row, jnp.zeros((d,), f32))
  ds_ref[b] = ds


@functools.cache
def _call(backward: bool, n: int, d: int, dtype, eps: float, interpret):
  nb, sds = pl.cdiv(n, ROWS), jax.ShapeDtypeStruct
  if backward:
    body, out = functools.partial(_backward_body, n, d), (sds((n, d), dtype), sds((nb, d), f32))
  else:
    body, out = functools.partial(_forward_body, n, d, eps), (sds((n, d), dtype), sds((n, d), dtype), sds((n,), f32))
  return plgpu.kernel(body, out_type=out, grid=(nb,), grid_names=("b",), interpret=interpret)


def _interpret(interpret):
  return common.interpret("pallas_gpu") if interpret is None else interpret


def forward(x, r, scale, eps: float, *, interpret=None):
  n, d = x.shape
  check(d, x.dtype)
  return _call(False, n, d, jnp.dtype(x.dtype), eps, _interpret(interpret))(x, r, scale)


def backward(g, gy, y, scale, rstd, *, interpret=None):
  n, d = y.shape
  check(d, y.dtype)
  dx, parts = _call(True, n, d, jnp.dtype(y.dtype), 0.0, _interpret(interpret))(g, gy, y, scale, rstd)
  return dx, parts.sum(0)
