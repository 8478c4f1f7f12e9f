"""Triton DoRA compose via jax-triton: one program per (``ROWS`` rows, ``BLOCK`` columns); the backward
keeps a float32 partial dg per program and writes it once (XLA sums the partials: no atomics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import common

f32 = jnp.float32
ROWS, BLOCK = 16, 1024


def check(op: str, d: int, dtype) -> None:
  if op != "compose":
    raise common.Unavailable(f"triton dora has only the compose kernel, not {op} (XLA's matmuls run it)")
  if jnp.dtype(dtype).itemsize > 4:
    raise common.Unavailable(f"triton dora takes 16/32-bit inputs, got {jnp.dtype(dtype)}")


@triton.jit
def _forward(base_ptr, lora_ptr, g_ptr, o_ptr, n, d, s, ROWS: tl.constexpr, BLOCK: tl.constexpr):
  b, cols = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
  m = cols < d
  g = tl.load(g_ptr + cols, mask=m, other=0.0).to(tl.float32)
  for j in range(ROWS):
    i = b.to(tl.int64) * ROWS + j
    if i < n:
      base = tl.load(base_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      lora = tl.load(lora_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      tl.store(o_ptr + i * d + cols, ((g - 1.0) * base + g * (s * lora)).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward(dout_ptr, base_ptr, lora_ptr, g_ptr, dbase_ptr, dlora_ptr, dg_ptr, n, d, s, ROWS: tl.constexpr,
              BLOCK: tl.constexpr):
  b, cols = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
  m = cols < d
  g = tl.load(g_ptr + cols, mask=m, other=0.0).to(tl.float32)
  acc = tl.zeros((BLOCK,), tl.float32)
  for j in range(ROWS):
    i = b.to(tl.int64) * ROWS + j
    if i < n:
      dout = tl.load(dout_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      base = tl.load(base_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      lora = tl.load(lora_ptr + i * d + cols, mask=m, other=0.0).to(tl.float32)
      tl.store(dbase_ptr + i * d + cols, ((g - 1.0) * dout).to(dbase_ptr.dtype.element_ty), mask=m)
      tl.store(dlora_ptr + i * d + cols, ((g * s) * dout).to(dlora_ptr.dtype.element_ty), mask=m)
      acc += dout * (base + s * lora)
  tl.store(dg_ptr + b.to(tl.int64) * d + cols, acc, mask=m)


def _grid(n: int, d: int) -> tuple[int, int]:
  return triton.cdiv(n, ROWS), triton.cdiv(d, BLOCK)


def compose_forward(base, lora, g, s: float):
  n, d = base.shape
  return common.triton_call(base, lora, g, n, d, float(s), kernel=_forward, grid=_grid(n, d), ROWS=ROWS, BLOCK=BLOCK,
                            out=jax.ShapeDtypeStruct((n, d), base.dtype))


def compose_backward(dout, base, lora, g, s: float):
  n, d = base.shape
  sds, grid = jax.ShapeDtypeStruct, _grid(n, d)
  dbase, dlora, parts = common.triton_call(
      dout, base, lora, g, n, d, float(s), kernel=_backward, grid=grid, ROWS=ROWS, BLOCK=BLOCK,
      out=(sds((n, d), base.dtype), sds((n, d), lora.dtype), sds((grid[0], d), f32)))
  return dbase, dlora, parts.sum(0)
