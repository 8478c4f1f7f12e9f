"""Pallas TPU: ``jax.experimental.pallas.ops.tpu.flash_attention`` (FlashAttention forward and backward in
Mosaic TPU, segment ids, causal) under the op's GQA and padding rules (``library.py``).

The library kernel is imported by ``check`` and when first run (a jax without it: Unavailable with the reason).
Tiles of the largest of 512 / 256 / 128 positions dividing T. On CPU the kernel runs in TPU interpret mode; there its
backward is taken from the kernel's own VJP re-traced under that mode (a second forward), since the outer ``grad``
traces the backward outside any context this function could hold."""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from kernels import common
from kernels.attention import library

FLASH = "jax.experimental.pallas.ops.tpu.flash_attention"  # imported when first run: a jax without it -> Unavailable


def check(dtype, shape, window) -> None:
  del dtype
  library.check(shape, window, "pallas_tpu", 128)
  common.library(FLASH, "pallas_tpu")


def _flash(q, k, v, seg):
  fa = common.library(FLASH, "pallas_tpu")
  t, h = q.shape[1], q.shape[3]
  bt = next(c for c in (512, 256, 128) if t % c == 0)
  blocks = fa.BlockSizes(block_q=bt, block_k_major=bt, block_k=bt, block_b=1, block_q_major_dkv=bt,
                         block_k_major_dkv=bt, block_k_dkv=bt, block_q_dkv=bt, block_k_major_dq=bt,
                         block_k_dq=bt, block_q_dq=bt)
  heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731  [B, N, T, H], the kernel's layout
  o = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v), segment_ids=fa.SegmentIds(seg, seg),
                         causal=True, sm_scale=h ** -0.5, block_sizes=blocks)
  return heads_first(o)


@jax.custom_vjp
def _interpreted(q, k, v, seg):
  with pltpu.force_tpu_interpret_mode():
    return _flash(q, k, v, seg)


def _interpreted_fwd(q, k, v, seg):
  return _interpreted(q, k, v, seg), (q, k, v, seg)


def _interpreted_bwd(res, do):
  q, k, v, seg = res
  with pltpu.force_tpu_interpret_mode():
    _, vjp = jax.vjp(lambda q, k, v: _flash(q, k, v, seg), q, k, v)
    return (*vjp(do), None)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def attention(q, k, v, seg, pos, window, *, interpret=None):
  """``interpret``: run in TPU interpret mode (default: on CPU only)."""
  del pos, window  # causal by index; check refused windows
  interpret = common.interpret("pallas_tpu") if interpret is None else interpret
  return library.attention(_interpreted if interpret else _flash, q, k, v, seg)
