"""Pallas Mosaic TPU DoRA compose: one grid step per block of whole rows in VMEM.

The forward writes ``(g − 1)·base + g·(s·lora)``; the backward reads (dout, base, lora) once and writes
d base, d lora and one float32 partial dg row per block (rows past N masked out, so the last block's
padding never reaches dg); XLA sums the partials. The math is :mod:`kernels.dora.xla`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common
from kernels.dora import xla

f32 = jnp.float32


def check(op: str, d: int, dtype) -> None:
  if op != "compose":
    raise common.Unavailable(f"pallas_tpu dora has only the compose kernel, not {op} (XLA's matmuls run it)")
  if jnp.dtype(dtype).itemsize > 4:
    raise common.Unavailable(f"pallas_tpu dora takes 16/32-bit inputs, got {jnp.dtype(dtype)}")


def block_rows(n: int, d: int) -> int:
  """All rows when few, else the largest power of two in [16, 1024] (bf16 tiles are 16 rows) with at most
  512 KiB of float32 per operand block (16 rows past D = 8192): five operands, double-buffered, and their
  float32 temporaries stay within the default scoped VMEM."""
  r = 16
  while r < 1024 and 2 * r * d * 4 <= 1 << 19:
    r *= 2
  return n if n <= r else r


def _load(*refs):
  return (ref[...].astype(f32) for ref in refs)


def _forward_kernel(s, base_ref, lora_ref, g_ref, o_ref):
  o_ref[...] = xla.delta(*_load(base_ref, lora_ref, g_ref), s).astype(o_ref.dtype)


def _backward_kernel(n, r, s, dout_ref, base_ref, lora_ref, g_ref, dbase_ref, dlora_ref, dg_ref):
  dbase, dlora, terms = xla.grads(*_load(dout_ref, base_ref, lora_ref, g_ref), s)
  dbase_ref[...] = dbase.astype(dbase_ref.dtype)
  dlora_ref[...] = dlora.astype(dlora_ref.dtype)
  live = pl.program_id(0) * r + jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) < n
  dg_ref[...] = jnp.sum(jnp.where(live, terms, 0.0), axis=0, keepdims=True)


@functools.cache
def _call(backward: bool, n: int, d: int, dtypes: tuple, r: int, s: float, interpret):
  rows, vec, nb = pl.BlockSpec((r, d), lambda i: (i, 0)), pl.BlockSpec((1, d), lambda i: (0, 0)), pl.cdiv(n, r)
  sds = jax.ShapeDtypeStruct
  if backward:
    kernel, in_specs = functools.partial(_backward_kernel, n, r, s), [rows, rows, rows, vec]
    out_specs = (rows, rows, pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0)))
    out_shape = (sds((n, d), dtypes[0]), sds((n, d), dtypes[1]), sds((nb, 1, d), f32))
  else:
    kernel, in_specs = functools.partial(_forward_kernel, s), [rows, rows, vec]
    out_specs, out_shape = rows, sds((n, d), dtypes[0])
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(nb,), in_specs=in_specs, out_specs=out_specs,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=interpret)


def _interpret(interpret):
  return common.interpret("pallas_tpu") if interpret is None else interpret


def compose_forward(base, lora, g, s: float, *, rows: int | None = None, interpret=None):
  n, d = base.shape
  call = _call(False, n, d, (jnp.dtype(base.dtype),), rows or block_rows(n, d), s, _interpret(interpret))
  return call(base, lora, g.reshape(1, d))


def compose_backward(dout, base, lora, g, s: float, *, rows: int | None = None, interpret=None):
  n, d = base.shape
  dtypes = (jnp.dtype(base.dtype), jnp.dtype(lora.dtype))
  call = _call(True, n, d, dtypes, rows or block_rows(n, d), s, _interpret(interpret))
  dbase, dlora, parts = call(dout, base, lora, g.reshape(1, d))
  return dbase, dlora, parts.sum((0, 1))
