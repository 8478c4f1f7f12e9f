"""Native CPU attention (``kernels/native/kernels.cc``: ``pmem_attn_fwd``, ``pmem_attn_bwd``), float32.

Tiles of 64 queries x 64 keys; a kv head's G query heads are stacked as the G·64 rows of a query tile, so
each key tile is packed once (kᵀ and v zero-padded to H rounded up to 16) for the whole group. A key tile
that no query of the tile sees (above the diagonal, another document, past the window) is skipped. The
matrix products are one register-tiled loop (4 rows x 16 columns of fused multiply-adds), the exponential
a branch-free polynomial, so both vectorize.

* forward (Alg. 1): work items (batch, kv head, query tile) over XLA's CPU thread pool; per key tile
  ``S = Q Kᵀ / sqrt(H)``, the online softmax (running row max m and sum l, the accumulator rescaled by
  ``e^(m − m')``), ``O += P V``; then ``o = O / l``, ``lse = m + log l``.
* backward (Alg. 2): work items (batch, kv head); key tiles outer (their dK, dV summed over every query tile
  and the group's heads, written once), query tiles inner (the sequence's dQ accumulated), so no two items
  write one output row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import native
from kernels.common import Unavailable

f32 = jnp.float32


def check(dtype, shape, window) -> None:
  del shape, window  # any T, H and window
  if jnp.dtype(dtype) != f32:
    raise Unavailable(f"native attention takes float32, got {jnp.dtype(dtype).name}")
  if (reason := native.available()) is not None:
    raise Unavailable(reason)


def forward(q, k, v, seg, pos, window):
  b, t, n, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct((b, t, n), f32))
  return native.call("pmem_attn_fwd", out, q, k, v, seg, pos, window=np.int64(window or 0))


def backward(q, k, v, seg, pos, o, lse, do, window):
  out = tuple(jax.ShapeDtypeStruct(x.shape, f32) for x in (q, k, v))
  return native.call("pmem_attn_bwd", out, q, k, v, seg, pos, o, lse, do.astype(f32), window=np.int64(window or 0))
