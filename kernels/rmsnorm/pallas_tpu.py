"""Pallas Mosaic TPU fused residual-add + RMSNorm: one grid step per block of rows, whole rows in VMEM.

The forward writes normed, the new residual and rstd; the backward reads (g, gy, y, rstd) once and
writes dx plus one float32 partial dscale row per block (rows past N are masked out, so the padding
of the last block never reaches dscale); XLA sums the partials.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common

f32 = jnp.float32


def check(d: int, dtype) -> None:
  del d, dtype


def block_rows(n: int, d: int) -> int:
  """All rows when few, else a power of two in [16, 1024] with about 1 MiB of float32 per block."""
  r = 16
  while r < 1024 and 2 * r * d * 4 <= 1 << 20:
    r *= 2
  return n if n <= r else r


def _forward_kernel(eps, x_ref, r_ref, s_ref, o_ref, y_ref, rstd_ref):
  y = (x_ref[...].astype(f32) + r_ref[...].astype(f32)).astype(y_ref.dtype)
  y_ref[...] = y
  y = y.astype(f32)
  rstd = jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)
  rstd_ref[...] = rstd
  o_ref[...] = (s_ref[...].astype(f32) * (y * rstd)).astype(o_ref.dtype)


def _backward_kernel(n, r, g_ref, gy_ref, y_ref, s_ref, rstd_ref, dx_ref, ds_ref):
  g, y, rstd = g_ref[...].astype(f32), y_ref[...].astype(f32), rstd_ref[...]
  u = g * s_ref[...].astype(f32)
  dx = rstd * (u - y * (rstd * rstd) * jnp.mean(u * y, axis=-1, keepdims=True)) + gy_ref[...].astype(f32)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  live = pl.program_id(0) * r + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) < n
  ds_ref[...] = jnp.sum(jnp.where(live, g * (y * rstd), 0.0), axis=0, keepdims=True)


@functools.cache
def _call(backward: bool, n: int, d: int, dtype, r: int, eps: float, interpret):
  rows, vec = pl.BlockSpec((r, d), lambda i: (i, 0)), pl.BlockSpec((1, d), lambda i: (0, 0))
  col, nb = pl.BlockSpec((r, 1), lambda i: (i, 0)), pl.cdiv(n, r)
  sds = jax.ShapeDtypeStruct
  if backward:
    kernel, in_specs = functools.partial(_backward_kernel, n, r), [rows, rows, rows, vec, col]
    out_specs, out_shape = (rows, pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))), (sds((n, d), dtype),
                                                                                      sds((nb, 1, d), f32))
  else:
    kernel, in_specs = functools.partial(_forward_kernel, eps), [rows, rows, vec]
    out_specs, out_shape = (rows, rows, col), (sds((n, d), dtype), sds((n, d), dtype), sds((n, 1), f32))
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(nb,), in_specs=in_specs, out_specs=out_specs,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=interpret)


def _interpret(interpret):
  return common.interpret("pallas_tpu") if interpret is None else interpret


def forward(x, r, scale, eps: float, *, rows: int | None = None, interpret=None):
  n, d = x.shape
  call = _call(False, n, d, jnp.dtype(x.dtype), rows or block_rows(n, d), eps, _interpret(interpret))
  normed, y, rstd = call(x, r, scale.reshape(1, d))
  return normed, y, rstd[:, 0]


def backward(g, gy, y, scale, rstd, *, rows: int | None = None, interpret=None):
  n, d = y.shape
  call = _call(True, n, d, jnp.dtype(y.dtype), rows or block_rows(n, d), 0.0, _interpret(interpret))
  dx, parts = call(g, gy, y, scale.reshape(1, d), rstd[:, None])
  return dx, parts.sum((0, 1))
