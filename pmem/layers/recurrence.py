"""Linear recurrences over a matrix state, in three forms that share one definition of the math.

  gated:  S_t = diag(g_t) S_{t-1} + k_t v_tᵀ                        (linear attention, GLA, Mamba2 / SSD)
  delta:  S_t = g_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ         (DeltaNet, Gated DeltaNet)
  o_t = S_tᵀ q_t

with ``g_t = exp(a_t)``: ``a`` (the log decay, <= 0) is one number per head ``[B, T, H]`` or one
per key dim ``[B, T, H, K]`` (gated only); ``β`` ``[B, T, H]``; ``q, k [B, T, H, K]``, ``v [B, T,
H, V]``; the state ``S [B, H, K, V]`` (float32). ``reset [B, T]`` marks document starts: the state
is zero before such a token, in every form (so packed documents never see each other); the mixers
give padding ``k = 0`` and ``a = 0`` (no change to the state).

- :func:`step`: one token (decode), the definition; :func:`naive`: ``lax.scan`` of :func:`step`
  over the tokens (the in-repo reference).
- :func:`chunked`: chunks of ``C`` tokens (training, prefill). Within a chunk, with ``b_t`` the
  inclusive cumulative log decay from the chunk start and the entering state ``S_0``,
  ``S_t = e_t S_0 + Σ_{s<=t} exp(b_t − b_s) k_s ṽ_sᵀ`` over ``s`` in t's document (``e_t = exp(b_t)``
  if t's document entered the chunk, else 0), where ``ṽ = v`` (gated) or, for the delta rule,
  ``ṽ_t = β_t (v_t − kᵀ_t g_t S_{t-1})``, i.e. ``(I + diag(β) L) ṽ = β ⊙ (v − e ⊙ K S_0)`` with ``L``
  strictly lower, ``L_ts = exp(b_t − b_s) k_t·k_s`` (the UT transform): ``ṽ = u − w S_0``, ``u, w``
  from one triangular solve per chunk, independent of the state. Then ``o = (q ⊙ e) S_0 +
  (QKᵀ ⊙ D) ṽ`` and the state passes to the next chunk in a ``lax.scan``. Every exponent is a
  difference ``b_t − b_s <= 0`` (masked entries ``-inf``), so no decay overflows.

Gradients of :func:`chunked` rematerialize the chunk states (``remat=True``): the saved residuals
are the inputs, not an f32 state per chunk (measured in ``tests/test_recurrence.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int
from kernels.common import accumulator, widen


def step(S: Float[Array, "B H K V"], q, k, v, a, beta=None, reset=None):
  """One token: ``q, k [B, H, K]``, ``v [B, H, V]``, ``a [B, H]`` or ``[B, H, K]``, ``beta [B, H]``
  (delta rule) or None, ``reset [B]`` → ``(S_t, o_t [B, H, V])``."""
  if reset is not None:
    S = jnp.where(reset[:, None, None, None], 0.0, S)
  g = jnp.exp(widen(a))
  S = S * (g[..., None] if g.ndim == 3 else g[..., None, None])
  if beta is not None:
    v = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, S))
  S = S + k[..., :, None] * v[..., None, :]
  return S, jnp.einsum("bhk,bhkv->bhv", q, S)


def naive(q, k, v, a, beta=None, reset=None, S0=None):
  """:func:`step` over the tokens: ``(o [B, T, H, V], S_T)``."""
  acc = accumulator(q.dtype, k.dtype, v.dtype, a.dtype)
  q, k, v, a = (x.astype(acc) for x in (q, k, v, a))
  b, _, h, dk = k.shape
  S0 = jnp.zeros((b, h, dk, v.shape[-1]), acc) if S0 is None else S0.astype(acc)
  xs = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a)]
  extra = [None if beta is None else jnp.moveaxis(beta.astype(acc), 1, 0),
           None if reset is None else jnp.moveaxis(reset, 1, 0)]

  def body(S, x):
    S, o = step(S, *x)
    return S, o

  S, o = jax.lax.scan(body, S0, (*xs, *extra))
  return jnp.moveaxis(o, 0, 1), S


def chunked(q, k, v, a, beta=None, reset=None, S0=None, chunk: int = 64, remat: bool = True):
  """The chunked form (module docstring): ``(o [B, T, H, V], S_T)``; ``T`` need not be a multiple of
  ``chunk`` (the last chunk is padded with tokens that change nothing)."""
  fn = jax.checkpoint(_chunked, static_argnums=(6,), policy=jax.checkpoint_policies.nothing_saveable) if remat \
      else _chunked
  return fn(q, k, v, a, beta, reset, chunk, S0)


def _chunked(q, k, v, a, beta, reset, c: int, S0):
  b, t, h, dk = k.shape
  dv, per_key = v.shape[-1], a.ndim == 4
  c = min(c, t)  # a call shorter than a chunk is one chunk of its length
  n = -(-t // c)
  pad = n * c - t

  def blocks(x, fill=0):  # [B, T, ...] -> [B, N, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill) if pad else x
    return x.reshape(b, n, c, *x.shape[2:])

  acc = accumulator(q.dtype, k.dtype, v.dtype, a.dtype)
  q, k, v, a = (blocks(x.astype(acc)) for x in (q, k, v, a))
  reset = blocks(jnp.zeros((b, t), bool) if reset is None else reset)
  S0 = jnp.zeros((b, h, dk, dv), acc) if S0 is None else S0.astype(acc)
  bcum = jnp.cumsum(a, axis=2)  # [B, N, C, H(, K)]
  doc = jnp.cumsum(reset.astype(jnp.int32), axis=2)  # document index within the chunk (0: the entering one)
  same = doc[:, :, :, None] == doc[:, :, None, :]  # [B, N, C(t), C(s)]
  causal = jnp.tril(jnp.ones((c, c), bool))
  mask = same & causal
  entered = (doc == 0)[..., None]  # [B, N, C, 1]: t's document entered the chunk
  last = doc[:, :, -1:]  # [B, N, 1]
  to_end = (doc == last)[..., None]  # [B, N, C, 1]: s contributes to the leaving state
  bl = bcum[:, :, -1:]  # [B, N, 1, H(, K)]
  e = jnp.where(entered[..., None] if per_key else entered, jnp.exp(bcum), 0.0)
  f = jnp.where(to_end[..., None] if per_key else to_end, jnp.exp(bl - bcum), 0.0)
  g_end = jnp.where((last == 0)[..., None] if per_key else last == 0, jnp.exp(bl[:, :, 0]), 0.0)  # [B, N, H(, K)]

  if per_key:  # D [B, N, H, C, C, K]
    diff = bcum[:, :, :, None] - bcum[:, :, None, :]  # [B, N, C, C, H, K]
    D = jnp.exp(jnp.where(mask[..., None, None], diff, -jnp.inf))
    A = jnp.einsum("bnthk,bnshk,bntshk->bnhts", q, k, D)
  else:  # D [B, N, H, C, C]
    diff = bcum[:, :, :, None] - bcum[:, :, None, :]  # [B, N, C, C, H]
    D = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
    A = jnp.einsum("bnthk,bnshk->bnhts", q, k) * jnp.moveaxis(D, -1, 2)
  if beta is None:
    u, w = v, None
  else:  # (I + diag(β) L) [u | w] = β ⊙ [v | e ⊙ k] (the UT transform), L strictly lower
    bt = blocks(beta.astype(acc))  # [B, N, C, H]
    kk = jnp.einsum("bnthk,bnshk->bnhts", k, k) * jnp.moveaxis(D, -1, 2)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    m = jnp.eye(c, dtype=acc) + jnp.where(strict, jnp.moveaxis(bt, 2, 3)[..., None] * kk, 0.0)
    rhs = jnp.concatenate([v, e[..., None] * k], -1) * bt[..., None]  # [B, N, C, H, V + K]
    sol = jax.scipy.linalg.solve_triangular(m, jnp.moveaxis(rhs, 3, 2), lower=True, unit_diagonal=True)
    sol = jnp.moveaxis(sol, 2, 3)  # [B, N, C, H, V + K]
    u, w = sol[..., :dv], sol[..., dv:]
  qe = q * (e if per_key else e[..., None])
  kf = k * (f if per_key else f[..., None])

  def body(S, x):  # one chunk: x = (qe, kf, A, u, w, g_end), [B, C, H, ...]
    qe, kf, A, u, w, g_end = x
    vt = u if w is None else u - jnp.einsum("bchk,bhkv->bchv", w, S)
    o = jnp.einsum("bchk,bhkv->bchv", qe, S) + jnp.einsum("bhts,bshv->bthv", A, vt)
    S = S * (g_end[..., None] if per_key else g_end[..., None, None]) + jnp.einsum("bchk,bchv->bhkv", kf, vt)
    return S, o

  xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (qe, kf, A, u, w, g_end))
  S, o = jax.lax.scan(body, S0, xs)
  o = jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, dv)[:, :t]
  return o, S


def doc_starts(positions: Int[Array, "B T"]) -> Bool[Array, "B T"]:
  """The tokens before which the state is zero: every document's first (position 0)."""
  return positions == 0
