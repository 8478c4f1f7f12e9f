"""Pallas Mosaic GPU ``segment_reduce`` (``plgpu.kernel``): one program per (output row, column chunk).

Program ``(s, c)`` walks the entries ``[off[s], off[s+1])`` of output row ``s`` in order, loads
``src[idx[p], chunk c]`` from global memory into registers (warpgroup-strided layout) and
accumulates ``w * row`` in float32: a deterministic segment sum without atomics. Long runs of one
id (a hot row in the backward pass) serialise in one program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import common


def check(d: int, dtype) -> None:
  if d % 128:
    raise common.Unavailable(f"pallas_gpu embedding needs D divisible by 128, got {d}")
  if jnp.dtype(dtype).itemsize > 4:
    raise common.Unavailable(f"pallas_gpu embedding supports 16/32-bit tables, got {jnp.dtype(dtype)}")


@functools.cache
def _call(n_src: int, d: int, dtype, num_segments: int, interpret):
  dc = next(c for c in (512, 256, 128) if d % c == 0)

  def body(idx_ref, off_ref, w_ref, src_ref, out_ref):
    s, c = jax.lax.axis_index("s"), jax.lax.axis_index("c")
    cols = pl.ds(c * dc, dc)

    def step(p, acc):
      i = idx_ref[p]
      add = lambda a: a + w_ref[p] * src_ref[i, cols].astype(jnp.float32)
      return jax.lax.cond((i >= 0) & (i < n_src), add, lambda a: a, acc)

    acc = jax.lax.fori_loop(off_ref[s], off_ref[s + 1], step, jnp.zeros((dc,), jnp.float32))
    out_ref[s, cols] = acc.astype(out_ref.dtype)

  # The last grid axis becomes CUDA's x (up to 2**31 - 1 blocks; y and z stop at 65535): the rows.
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((num_segments, d), dtype), grid=(d // dc, num_segments),
                      grid_names=("c", "s"), interpret=interpret)


def segment_reduce(src, idx, seg, num_segments: int, weights=None, *, interpret=None):
  """out[s] = sum_{p: seg[p] = s} weights[p] * src[idx[p]] (f32 accumulation); idx outside [0, V) skipped."""
  n_src, d = src.shape
  check(d, src.dtype)
  offsets = jnp.searchsorted(seg, jnp.arange(num_segments + 1, dtype=jnp.int32)).astype(jnp.int32)
  w = jnp.ones(idx.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  call = _call(n_src, d, jnp.dtype(src.dtype), num_segments,
               common.interpret("pallas_gpu") if interpret is None else interpret)
  return call(idx, offsets, w, src)
