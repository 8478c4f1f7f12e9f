"""Triton ``segment_reduce`` via jax-triton: one program per (output row, column block).

Same schedule as the Mosaic GPU kernel: walk the entries of one output row in order and
accumulate ``w * src[idx]`` in float32 registers; deterministic, no atomics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import common

BLOCK_D = 256


def check(d: int, dtype) -> None:
  del d, dtype


@triton.jit
def _segment_reduce(src_ptr, idx_ptr, off_ptr, w_ptr, out_ptr, n_src, d, BLOCK: tl.constexpr):
  s = tl.program_id(0)
  cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
  in_row = cols < d
  acc = tl.zeros((BLOCK,), tl.float32)
  for p in range(tl.load(off_ptr + s), tl.load(off_ptr + s + 1)):
    i = tl.load(idx_ptr + p)
    ok = (i >= 0) & (i < n_src)
    x = tl.load(src_ptr + i.to(tl.int64) * d + cols, mask=in_row & ok, other=0.0)
    acc += tl.where(ok, tl.load(w_ptr + p) * x.to(tl.float32), 0.0)
  tl.store(out_ptr + s.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def segment_reduce(src, idx, seg, num_segments: int, weights=None):
  """out[s] = sum_{p: seg[p] = s} weights[p] * src[idx[p]] (f32 accumulation); idx outside [0, V) skipped."""
  n_src, d = src.shape
  offsets = jnp.searchsorted(seg, jnp.arange(num_segments + 1, dtype=jnp.int32)).astype(jnp.int32)
  w = jnp.ones(idx.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  block = min(BLOCK_D, triton.next_power_of_2(d))
  return common.triton_call(
      src, idx.astype(jnp.int32), offsets, w, n_src, d, kernel=_segment_reduce,
      out=jax.ShapeDtypeStruct((num_segments, d), src.dtype), grid=(num_segments, triton.cdiv(d, block)),
      BLOCK=block)
