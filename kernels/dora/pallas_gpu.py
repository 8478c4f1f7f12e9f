"""Pallas Mosaic GPU DoRA compose (``plgpu.kernel``): one program per (column chunk, block of ``ROWS`` rows),
one row chunk at a time in registers (warpgroup-strided layout). The backward accumulates a float32
partial dg per program in registers and writes it once; XLA sums the partials (no atomics). The math is
:mod:`kernels.dora.xla`'s."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import common
from kernels.dora import xla

f32 = jnp.float32
ROWS = 16


def check(op: str, d: int, dtype) -> None:
  if op != "compose":
    raise common.Unavailable(f"pallas_gpu dora has only the compose kernel, not {op} (XLA's matmuls run it)")
  if d % 128:
    raise common.Unavailable(f"pallas_gpu dora needs D divisible by 128, got {d}")
  if jnp.dtype(dtype).itemsize > 4:
    raise common.Unavailable(f"pallas_gpu dora takes 16/32-bit inputs, got {jnp.dtype(dtype)}")


def _rows(n, dc, body, init):
  """``body(i, cols, carry)`` over this program's rows ``i`` at its columns; returns (row block, cols, carry)."""
  b, cols = jax.lax.axis_index("b"), pl.ds(jax.lax.axis_index("c") * dc, dc)
  out = jax.lax.fori_loop(0, jnp.minimum(ROWS, n - b * ROWS), lambda j, c: body(b * ROWS + j, cols, c), init)
  return b, cols, out


def _forward_body(n, dc, s, base_ref, lora_ref, g_ref, o_ref):
  def row(i, cols, _):
    g = g_ref[cols].astype(f32)
    o_ref[i, cols] = xla.delta(base_ref[i, cols].astype(f32), lora_ref[i, cols].astype(f32), g, s).astype(o_ref.dtype)
  _rows(n, dc, row, None)


def _backward_body(n, dc, s, dout_ref, base_ref, lora_ref, g_ref, dbase_ref, dlora_ref, dg_ref):
  def row(i, cols, acc):
    dbase, dlora, terms = xla.grads(*(ref[i, cols].astype(f32) for ref in (dout_ref, base_ref, lora_ref)),
                                    g_ref[cols].astype(f32), s)
    dbase_ref[i, cols] = dbase.astype(dbase_ref.dtype)
    dlora_ref[i, cols] = dlora.astype(dlora_ref.dtype)
    return acc + terms
  b, cols, acc = _rows(n, dc, row, jnp.zeros((dc,), f32))
  dg_ref[b, cols] = acc


@functools.cache
def _call(backward: bool, n: int, d: int, dtypes: tuple, s: float, interpret):
  dc, nb, sds = next(c for c in (512, 256, 128) if d % c == 0), pl.cdiv(n, ROWS), jax.ShapeDtypeStruct
  if backward:
    body = functools.partial(_backward_body, n, dc, s)
    out = (sds((n, d), dtypes[0]), sds((n, d), dtypes[1]), sds((nb, d), f32))
  else:
    body, out = functools.partial(_forward_body, n, dc, s), sds((n, d), dtypes[0])
  return plgpu.kernel(body, out_type=out, grid=(d // dc, nb), grid_names=("c", "b"), interpret=interpret)


def _interpret(interpret):
  return common.interpret("pallas_gpu") if interpret is None else interpret


def compose_forward(base, lora, g, s: float, *, interpret=None):
  n, d = base.shape
  check("compose", d, base.dtype)
  return _call(False, n, d, (jnp.dtype(base.dtype),), s, _interpret(interpret))(base, lora, g)


def compose_backward(dout, base, lora, g, s: float, *, interpret=None):
  n, d = base.shape
  check("compose", d, base.dtype)
  dtypes = (jnp.dtype(base.dtype), jnp.dtype(lora.dtype))
  dbase, dlora, parts = _call(True, n, d, dtypes, s, _interpret(interpret))(dout, base, lora, g)
  return dbase, dlora, parts.sum(0)
