"""Pallas GPU: pmem's FlashAttention-2 (Dao 2023) in the generic ``pl.pallas_call`` (lowered through Triton on a
CUDA GPU, no jax-triton; interpreted on CPU), causal with segment ids; the index maps pick each head's kv head.

Blocks of ``BLOCK`` queries x ``BLOCK`` keys (query block i sees key blocks 0..i), H zero-padded to a power of two
>= 16 (Triton's dot), float32 accumulation, outputs in the inputs' dtypes:

* forward (Alg. 1): a program per (batch, query block, query head) runs the online softmax over its key blocks;
  writes o = O / l and lse = m + log l.
* backward (Alg. 2), recomputing P = exp(S − lse) with D = rowsum(dO ⊙ O) from XLA, in two kernels so that no two
  programs write one row (no atomics): per (batch, key block, kv head) dK, dV over the group's heads and the query
  blocks from the diagonal on; per (batch, query block, query head) dQ over its key blocks.

A padding query (segment 0) sees no key in the kernels: its output is set to the mean of ``v`` and its dO / T added
to every key's dV outside them; it passes no gradient to q or k (ops.py's contract)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import common

f32 = jnp.float32
BLOCK = 64  # queries and keys per block
MAX_HEAD_DIM = 128
NEG = -1e30  # the running max of a row that has seen no key yet: finite, so e^(m − m') stays 1, never nan
SQ = pl.squeezed  # a block dimension indexed by the grid, absent from the kernel's ref
TRITON = "jax.experimental.pallas.triton"  # Pallas's Triton backend (deprecated upstream), imported to compile


def check(dtype, shape, window) -> None:
  t, h = shape[1], shape[3]
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise common.Unavailable(f"pallas_gpu attention takes float32, bfloat16 or float16, got {jnp.dtype(dtype).name}")
  if window is not None:
    raise common.Unavailable(f"pallas_gpu attention has no sliding window (window={window})")
  if t % BLOCK:
    raise common.Unavailable(f"pallas_gpu attention needs T divisible by {BLOCK}, got {t}")
  if h > MAX_HEAD_DIM:
    raise common.Unavailable(f"pallas_gpu attention needs head_dim <= {MAX_HEAD_DIM}, got {h}")
  if common.platform() == "gpu":
    common.library(TRITON, "pallas_gpu")  # what compiles the kernels


def _dot(a, b, dims):
  """a · b contracting a's axis dims[0] with b's axis dims[1], float32 accumulation."""
  return jax.lax.dot_general(a, b, ((dims[:1], dims[1:]), ((), ())), preferred_element_type=f32)


def _seen(sq, sk, i, j):
  """[bq, bk]: a query of block i (segment sq [bq]) sees a key of block j (sk [bk])."""
  rq, rk = i * BLOCK + jnp.arange(BLOCK), j * BLOCK + jnp.arange(BLOCK)
  return (rk[None] <= rq[:, None]) & (sk[None] == sq[:, None]) & (sq[:, None] > 0)


def _probs(q, k, lse, sq, sk, i, j, c):
  """P [bq, bk] = exp(S − lse), 0 where the query does not see the key."""
  return jnp.where(_seen(sq, sk, i, j), jnp.exp(_dot(q, k, (1, 1)) * c - lse[:, None]), 0.0)


def _forward_kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, *, c):
  i = pl.program_id(1)
  q, sq = q_ref[...], sq_ref[...]  # [bq, hp], [bq]

  def step(j, carry):  # Alg. 1 lines 8-10: S, the row max m', P = e^(S − m'), O and l rescaled by e^(m − m')
    o, m, l = carry
    ks = pl.ds(j * BLOCK, BLOCK)
    seen = _seen(sq, sk_ref[ks], i, j)
    s = _dot(q, k_ref[ks, :], (1, 1)) * c  # [bq, bk]
    m2 = jnp.maximum(m, jnp.where(seen, s, NEG).max(1))
    p = jnp.where(seen, jnp.exp(s - m2[:, None]), 0.0)
    a = jnp.exp(m - m2)
    return o * a[:, None] + _dot(p.astype(v_ref.dtype), v_ref[ks, :], (1, 0)), m2, l * a + p.sum(1)

  z = jnp.zeros((BLOCK,), f32)
  o, m, l = jax.lax.fori_loop(0, i + 1, step, (jnp.zeros(q.shape, f32), z + NEG, z))
  l = jnp.where(l > 0, l, 1.0)  # a padding row saw no key: o = 0 here
  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)  # Alg. 1 lines 12-13
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, sq_ref, sk_ref, dq_ref, *, c):
  i = pl.program_id(1)
  q, do, lse, dd, sq = q_ref[...], do_ref[...], lse_ref[...], d_ref[...], sq_ref[...]  # [bq, hp] x2, [bq] x3

  def step(j, dq):  # Alg. 2's inner step for dQ alone: P, dP = dO Vᵀ, dS = P ⊙ (dP − D), dQ += dS K
    ks = pl.ds(j * BLOCK, BLOCK)
    k = k_ref[ks, :]
    p = _probs(q, k, lse, sq, sk_ref[ks], i, j, c)
    ds = p * (_dot(do, v_ref[ks, :], (1, 1)) - dd[:, None])
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq_ref[...] = jax.lax.fori_loop(0, i + 1, step, jnp.zeros(q.shape, f32)) * c


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, sq_ref, sk_ref, dk_ref, dv_ref, *, c):
  j = pl.program_id(1)
  k, v, sk = k_ref[...], v_ref[...], sk_ref[...]  # [bk, hp] x2, [bk]
  nq = q_ref.shape[0] // BLOCK - j  # query blocks i = j.. that see this key block, for each of the G heads

  def step(x, carry):  # Alg. 2's inner step for query block i of the group's head g: dV += Pᵀ dO, dK += dSᵀ Q
    dk, dv = carry
    g, i = x // nq, j + x % nq
    qs = pl.ds(i * BLOCK, BLOCK)
    q, do = q_ref[qs, g, :], do_ref[qs, g, :]
    p = _probs(q, k, lse_ref[qs, g], sq_ref[qs], sk, i, j, c)
    ds = p * (_dot(do, v, (1, 1)) - d_ref[qs, g][:, None])
    return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))

  zero = jnp.zeros(k.shape, f32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[1] * nq, step, (zero, zero))
  dk_ref[...], dv_ref[...] = dk * c, dv


def _call(kernel, grid, args, in_specs, out_shape, out_specs, interpret):
  """``kernel`` over ``grid``; compiled, 4 warps and 2 pipeline stages (two 64 x 128 float32 k, v tiles each)."""
  params = None if interpret else common.library(TRITON, "pallas_gpu").CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=params, interpret=interpret)(*args)


def _pad(x, hp):
  return jnp.pad(x, ((0, 0),) * 3 + ((0, hp - x.shape[3]),))  # zero columns leave q·k and P V unchanged


def _specs(t, hp, g):
  """BlockSpecs over a grid (b, block, head): ``BLOCK`` rows of the head, all ``t`` rows of its kv head (n // g),
  the block's lse (or D) rows, and the segment ids of the block and of the whole row."""
  rows = pl.BlockSpec((SQ, BLOCK, SQ, hp), lambda b, i, n: (b, i, n, 0))
  kv = pl.BlockSpec((SQ, t, SQ, hp), lambda b, i, n: (b, 0, n // g, 0))
  lse = pl.BlockSpec((SQ, BLOCK, SQ), lambda b, i, n: (b, i, n))
  return rows, kv, lse, pl.BlockSpec((SQ, BLOCK), lambda b, i, n: (b, i)), pl.BlockSpec((SQ, t), lambda b, i, n: (b, 0))


def forward(q, k, v, seg, pos, window, *, interpret=None):
  """(o [B, T, N, H] in q's dtype, lse [B, T, N] float32); ``interpret``: Pallas's interpreter (default: on CPU)."""
  del pos, window  # causal by index; check refused windows
  b, t, n, h = q.shape
  g, hp = n // k.shape[2], max(16, pl.next_power_of_2(h))
  rows, kv, lse_rows, seg_rows, seg_all = _specs(t, hp, g)
  o, lse = _call(functools.partial(_forward_kernel, c=h ** -0.5), (b, t // BLOCK, n),
                 (_pad(q, hp), _pad(k, hp), _pad(v, hp), seg, seg), (rows, kv, kv, seg_rows, seg_all),
                 (jax.ShapeDtypeStruct((b, t, n, hp), q.dtype), jax.ShapeDtypeStruct((b, t, n), f32)),
                 (rows, lse_rows), common.platform() == "cpu" if interpret is None else interpret)
  mean = jnp.repeat(v.astype(f32).mean(1, keepdims=True), g, axis=2).astype(q.dtype)  # [B, 1, N, H]
  return jnp.where((seg == 0)[:, :, None, None], mean, o[..., :h]), lse


def backward(q, k, v, seg, pos, o, lse, do, window, *, interpret=None):
  """(dq, dk, dv) in the dtypes of q, k, v."""
  del pos, window
  b, t, n, h = q.shape
  kh = k.shape[2]
  g, hp = n // kh, max(16, pl.next_power_of_2(h))
  interpret = common.platform() == "cpu" if interpret is None else interpret
  dd = (do.astype(f32) * o.astype(f32)).sum(3)  # D = rowsum(dO ⊙ O) [B, T, N]
  qp, kp, vp, dop = (_pad(x, hp) for x in (q, k, v, do))
  rows, kv, lse_rows, seg_rows, seg_all = _specs(t, hp, g)
  c = h ** -0.5
  dq = _call(functools.partial(_dq_kernel, c=c), (b, t // BLOCK, n), (qp, kp, vp, dop, lse, dd, seg, seg),
             (rows, kv, kv, rows, lse_rows, lse_rows, seg_rows, seg_all), jax.ShapeDtypeStruct(qp.shape, f32), rows,
             interpret)
  group = lambda x: x.reshape(b, t, kh, g, *x.shape[3:])  # noqa: E731  [B, T, K, G, ...]: a kv head's query heads
  heads = pl.BlockSpec((SQ, t, SQ, g, hp), lambda b, j, n: (b, 0, n, 0, 0))
  lse_heads = pl.BlockSpec((SQ, t, SQ, g), lambda b, j, n: (b, 0, n, 0))
  kv_rows = pl.BlockSpec((SQ, BLOCK, SQ, hp), lambda b, j, n: (b, j, n, 0))
  dk, dv = _call(functools.partial(_dkv_kernel, c=c), (b, t // BLOCK, kh),
                 (group(qp), kp, vp, group(dop), group(lse), group(dd), seg, seg),
                 (heads, kv_rows, kv_rows, heads, lse_heads, lse_heads, seg_all, seg_rows),
                 (jax.ShapeDtypeStruct(kp.shape, f32),) * 2, (kv_rows, kv_rows), interpret)
  dv_pad = group(jnp.where((seg == 0)[:, :, None, None], do.astype(f32), 0.0)).sum((1, 3)) / t  # [B, K, H]
  return dq[..., :h].astype(q.dtype), dk[..., :h].astype(k.dtype), (dv[..., :h] + dv_pad[:, None]).astype(v.dtype)
