"""Mamba2's SSD mixer (pmem.layers.mamba2) against an independent float64 NumPy transcription of
Dao & Gu 2024, "Transformers are SSMs" (arXiv:2405.21060; no JAX in the reference): (1) the whole
mixer (the Mamba-2 block of §7: in-projection, short causal conv + SiLU, the SSM of §3 with a
scalar A per head, D skip, gated RMSNorm, out-projection) for T = 37 (not a multiple of chunks 8
and 64), two packed documents in a row and left padding in another (real tokens compared); (2) the
SSD dual, quadratic form Y = (L ∘ C Bᵀ) X (§5) against the float64 recurrence and against pmem's
float32 ``recurrence.chunked`` / ``naive`` with one decay per head, as mamba2.py calls them;
(3) the SSM state after a prefill against the reference's h_T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmem.core.mixer import TokenContext
from pmem.layers import recurrence
from pmem.layers.mamba2 import Mamba2
from tests.tolerances import assert_close

D_MODEL, N, P, T = 32, 16, 8, 37  # d_model, d_state, head_dim (expand 2: 64 inner channels, 8 heads)


def layout():
  """positions / segment_ids [3, T]: one document; two packed (the second from 13); 5 padding tokens."""
  pos, seg = np.tile(np.arange(T), (3, 1)), np.ones((3, T), np.int64)
  pos[1, 13:], seg[1, 13:] = np.arange(T - 13), 2
  pos[2, :5], seg[2, :5], pos[2, 5:] = 0, 0, np.arange(T - 5)
  return pos, seg


def silu(u):
  return u / (1 + np.exp(-u))


def ssm(C, B, X, dt, A, pos, seg):
  """The recurrence (§3.1, A_t = exp(dt_t A) I per head): h_t = exp(dt_t A) h_{t−1} + dt_t B_t x_tᵀ,
  y_t = h_tᵀ C_t; h = 0 before a document start (position 0), padding changes nothing →
  (y [b, T, H, P], h_T [b, H, N, P])."""
  h, y = np.zeros((X.shape[0], X.shape[2], B.shape[-1], X.shape[3])), np.zeros(X.shape)
  for t in range(X.shape[1]):
    real = (seg[:, t] > 0)[:, None, None, None]
    h = np.where(real & (pos[:, t] == 0)[:, None, None, None], 0.0, h)
    nxt = np.exp(dt[:, t] * A)[..., None, None] * h + np.einsum("bh,bn,bhp->bhnp", dt[:, t], B[:, t], X[:, t])
    h = np.where(real, nxt, h)
    y[:, t] = np.einsum("bhnp,bn->bhp", h, C[:, t])
  return y, h


def dual(C, B, X, dt, A, pos):
  """The quadratic form (§5): Y = (L ∘ C Bᵀ) (dt X) per head, L_ts = exp(Σ_{s<r<=t} a_r) for s <= t in
  one document (else 0), a = dt A."""
  cum = np.cumsum(dt * A, 1)  # [b, T, H]
  doc = np.cumsum(pos == 0, 1)
  mask = (doc[:, :, None] == doc[:, None, :]) & np.tri(pos.shape[1], dtype=bool)  # [b, t, s]
  L = np.exp(np.where(mask[..., None], cum[:, :, None] - cum[:, None, :], -np.inf))  # [b, t, s, H]
  return np.einsum("btsh,bts,bshp->bthp", L, np.einsum("btn,bsn->bts", C, B), dt[..., None] * X)


def reference(m, x, pos, seg):
  """``Mamba2.__call__`` in float64 from the module's parameters → (out [b, T, d], h_T, conv tail)."""
  w = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(m, nnx.Param)).items() if k != "conv"}
  wc = np.asarray(m.conv.w[...], np.float64)  # [W, channels]: y_t = Σ_j wc_j x_{t−j}, j <= position_t
  (bs, t, _), inner, H = x.shape, m.inner, m.n_heads
  z, xbc, dt = np.split(x @ w["w_in"], [inner, 2 * inner + 2 * N], -1)
  lag = lambda u, j: np.pad(u, ((0, 0), (j, 0), (0, 0)))[:, :t]  # noqa: E731  u_{t−j}
  u = silu(sum(np.where((pos >= j)[..., None], lag(xbc, j), 0.0) * wc[j] for j in range(len(wc))))
  X, B, C = np.split(u, [inner, inner + N], -1)
  X = X.reshape(bs, t, H, P)
  dt = np.logaddexp(0.0, dt + w["dt_bias"])  # softplus
  y, h = ssm(C, B, X, dt, -np.exp(w["A_log"]), pos, seg)
  y = (y + w["D"][:, None] * X).reshape(bs, t, inner) * silu(z)  # y_t + D x_t, gate SiLU(z)
  y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-6) * w["norm"]  # RMSNorm over the inner channels
  return y @ w["w_out"], h, xbc[:, -(len(wc) - 1):]


def mixer():
  """A Mamba2 with every parameter perturbed (gates, decays, conv, D, norm off their inits) and an input."""
  m = Mamba2(D_MODEL, d_state=N, head_dim=P, rngs=nnx.Rngs(0))
  leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))
  return m, np.asarray(jax.random.normal(jax.random.key(2), (3, T, D_MODEL)))


def ctx(pos, seg):
  return TokenContext(None, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32), {})


# float32 vs float64 (k = 1/2), the roundings on the way: the in-projection's d_model-products, the
# conv's 4 taps, the SSM (2T + N: sums over <= T tokens of N-products B·C, each under a product of up
# to T decays; chunked also exp of differences of a float32 cumulative log decay over min(C, T)
# tokens), the RMSNorm's mean over 64 inner channels, the out-projection's 64-products, and 16 for
# the elementwise SiLU / softplus / exp / rsqrt / gate (measured: <= 6% of this tolerance)
def terms(c):
  return D_MODEL + 4 + 2 * T + N + min(c, T) + 2 * 64 + 16


@pytest.mark.parametrize("chunk", [8, 64])
def test_mixer_equals_the_float64_transcription(chunk):
  m, x = mixer()
  m.chunk = chunk
  pos, seg = layout()
  want, h, tail = reference(m, x.astype(np.float64), pos, seg)
  real = seg > 0
  assert_close(np.asarray(m(jnp.asarray(x), ctx(pos, seg)))[real], want[real], terms=terms(chunk), k=0.5)
  # (3) prefill from init_state: the same outputs, h_T (sums over <= T tokens) and the conv tail
  y, s = m(jnp.asarray(x), ctx(pos, seg), m.init_state(3, 64))
  assert_close(np.asarray(y)[real], want[real], terms=terms(chunk), k=0.5)
  assert_close(s["S"], h, terms=terms(chunk), k=0.5)
  assert_close(s["conv"], tail, terms=D_MODEL, k=0.5)


def test_dual_form_equals_the_recurrence_and_pmem():
  r = np.random.default_rng(0)
  H, (pos, seg) = 4, layout()
  pos, seg = pos[:2], seg[:2]  # one document, two packed
  C, B = r.normal(size=(2, 2, T, N))
  X = r.normal(size=(2, T, H, P))
  dt = np.logaddexp(0.0, r.normal(size=(2, T, H)) - 1)  # softplus: dt in (0, ~3)
  A = -r.uniform(1, 16, H) * 0.1
  C, B, X, dt, A = (np.float32(v).astype(np.float64) for v in (C, B, X, dt, A))
  Y = dual(C, B, X, dt, A, pos)
  y, h = ssm(C, B, X, dt, A, pos, seg)
  assert_close(Y, y, dtype=np.float64, terms=2 * T + N)  # float64 both ways: rtol 2e-14
  hd = lambda u: np.broadcast_to(u[:, :, None], (2, T, H, N)).astype(np.float32)  # noqa: E731
  args = (hd(C), hd(B), (X * dt[..., None]).astype(np.float32), (dt * A).astype(np.float32))
  reset = recurrence.doc_starts(jnp.asarray(pos))
  for c, (o, S) in [(0, recurrence.naive(*args, reset=reset))] + \
                   [(c, recurrence.chunked(*args, reset=reset, chunk=c)) for c in (8, 64)]:
    assert_close(o, Y, terms=2 * T + N + min(c, T), k=0.5)  # the SSM's share of terms()
    assert_close(S, h, terms=2 * T + N + min(c, T), k=0.5)
