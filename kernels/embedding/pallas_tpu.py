"""Pallas Mosaic TPU ``segment_reduce``: scalar-prefetched ids, manual row DMAs from HBM.

Grid step ``b`` owns output rows ``[b*R, (b+1)*R)`` and the contiguous range of (sorted) entries
that map to them. It streams those entries' source rows from HBM into a ring of ``slots`` VMEM
buffers (that many DMAs in flight, the paged-attention pattern), accumulates ``w * row`` into a
float32 VMEM block in entry order, and writes the block once. ids, run numbers, per-block entry
offsets and weights are scalar-prefetched into SMEM: one call keeps ``3 * P + nb`` words there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common


def check(d: int, dtype) -> None:
  del d, dtype


def block_rows(num_segments: int, d: int) -> int:
  """Output rows per grid step: all of them when few, else a multiple of 16 with a <= 2 MiB f32 block."""
  r = max(16, min(256, (2 << 20) // (4 * d) // 16 * 16))
  return num_segments if num_segments <= r else r


@functools.cache
def _call(n_src: int, d: int, dtype, num_segments: int, r: int, slots: int, weighted: bool, interpret):
  def kernel(idx_ref, seg_ref, off_ref, *refs):
    w_ref, src_hbm, out_ref, buf, sem, acc = refs if weighted else (None, *refs)
    b = pl.program_id(0)
    lo, hi = off_ref[b], off_ref[b + 1]
    acc[...] = jnp.zeros_like(acc)

    def valid(p):
      return (idx_ref[p] >= 0) & (idx_ref[p] < n_src)

    def dma(p):
      slot = (p - lo) % slots
      row = jnp.clip(idx_ref[p], 0, n_src - 1)
      return pltpu.make_async_copy(src_hbm.at[pl.ds(row, 1)], buf.at[slot], sem.at[slot])

    def start(p):
      @pl.when(p < hi)
      def _():
        @pl.when(valid(p))
        def _():
          dma(p).start()

    @pl.loop(0, slots)
    def _(j):
      start(lo + j)

    @pl.loop(lo, hi)
    def _(p):
      @pl.when(valid(p))
      def _():
        dma(p).wait()
        x = buf[(p - lo) % slots].astype(jnp.float32)
        acc[pl.ds(seg_ref[p] - b * r, 1), :] += x * w_ref[p] if weighted else x
      start(p + slots)

    out_ref[...] = acc[...].astype(out_ref.dtype)

  nb = pl.cdiv(num_segments, r)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4 if weighted else 3, grid=(nb,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((r, d), lambda b, *_: (b, 0)),
      scratch_shapes=[pltpu.VMEM((slots, 1, d), dtype), pltpu.SemaphoreType.DMA((slots,)),
                      pltpu.VMEM((r, d), jnp.float32)])
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_segments, d), dtype), grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=interpret)


def segment_reduce(src, idx, seg, num_segments: int, weights=None, *, rows: int | None = None,
                   slots: int | None = None, interpret=None):
  """out[s] = sum_{p: seg[p] = s} weights[p] * src[idx[p]] (f32 accumulation); idx outside [0, V) skipped.
  ``slots`` DMAs in flight: 8 on TPU, 2 when interpreted (the same code, cheaper to compile)."""
  n_src, d = src.shape
  interpret = common.interpret("pallas_tpu") if interpret is None else interpret
  r = rows or block_rows(num_segments, d)
  nb = pl.cdiv(num_segments, r)
  offsets = jnp.searchsorted(seg, jnp.arange(nb + 1, dtype=jnp.int32) * r).astype(jnp.int32)
  prefetch = (idx, seg, offsets) + (() if weights is None else (weights.astype(jnp.float32),))
  call = _call(n_src, d, jnp.dtype(src.dtype), num_segments, r, slots or (2 if interpret else 8),
               weights is not None, interpret)
  return call(*prefetch, src)
