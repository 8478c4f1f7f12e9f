"""Triton fused residual-add + RMSNorm via jax-triton: the forward runs one program per row, the
backward one per ``ROWS`` rows with a float32 partial dscale per program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import common

f32 = jnp.float32
ROWS = 16


def check(d: int, dtype) -> None:
  if d > 65536:
    raise common.Unavailable(f"triton rmsnorm keeps a row in registers: D <= 65536, got {d}")


@triton.jit
def _forward(x_ptr, r_ptr, s_ptr, o_ptr, y_ptr, rstd_ptr, d, eps, BLOCK: tl.constexpr):
  i = tl.program_id(0).to(tl.int64)
  cols = tl.arange(0, BLOCK)
  m = cols < d
  x = tl.load(x_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
  r = tl.load(r_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
  y = (x + r).to(y_ptr.dtype.element_ty)
  tl.store(y_ptr + i * d + cols, y, mask=m)
  y = y.to(tl.float32)
  rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / d + eps)
  tl.store(rstd_ptr + i, rstd)
  s = tl.load(s_ptr + cols, mask=m, other=0.0).to(tl.float32)
  tl.store(o_ptr + i * d + cols, (s * (y * rstd)).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward(g_ptr, gy_ptr, y_ptr, s_ptr, rstd_ptr, dx_ptr, ds_ptr, n, d, ROWS: tl.constexpr, BLOCK: tl.constexpr):
  b = tl.program_id(0)
  cols = tl.arange(0, BLOCK)
  m = cols < d
  s = tl.load(s_ptr + cols, mask=m, other=0.0).to(tl.float32)
  ds = tl.zeros((BLOCK,), tl.float32)
  for j in range(ROWS):
    i = b.to(tl.int64) * ROWS + j
    if i < n:
      g = tl.load(g_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      y = tl.load(y_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      rstd = tl.load(rstd_ptr + i)
      u = g * s
      dx = rstd * (u - y * (rstd * rstd) * (tl.sum(u * y, axis=0) / d))
      dx += tl.load(gy_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      tl.store(dx_ptr + i * d + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
      ds += g * (y * rstd)
  tl.store(ds_ptr + b.to(tl.int64) * d + cols, ds, mask=m)


def forward(x, r, scale, eps: float):
  n, d = x.shape
  sds = jax.ShapeDtypeStruct
  return common.triton_call(
      x, r, scale, d, float(eps), kernel=_forward, grid=(n,), BLOCK=triton.next_power_of_2(d),
      out=(sds((n, d), x.dtype), sds((n, d), x.dtype), sds((n,), f32)))


def backward(g, gy, y, scale, rstd):
  n, d = y.shape
  nb = triton.cdiv(n, ROWS)
  sds = jax.ShapeDtypeStruct
  dx, parts = common.triton_call(
      g, gy, y, scale, rstd, n, d, kernel=_backward, grid=(nb,), ROWS=ROWS, BLOCK=triton.next_power_of_2(d),
      out=(sds((n, d), y.dtype), sds((nb, d), f32)))
  return dx, parts.sum(0)
