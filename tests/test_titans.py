"""Titans' neural long-term memory (pmem/memory/titans.py) against an independent float64 NumPy transcription of
the update equations (eq. 10-15: the inner gradient by hand-written backprop through the MLP and the residual norm),
token by token: chunk size 1 is the per-token recurrence, chunk size b the chunk-start-gradient semantics, over
packed documents, padding and a final partial chunk; against fla 0.6.0's naive Titans (linear memory with the
residual LayerNorm; experiments/oracles/fla_titans.py); heads independent; a read does not write; a sequence shorter
than a chunk updates; a prompt split anywhere gives the state of the whole; the ablation fiddler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.mixer import TokenContext
from pmem.memory.titans import MemoryAsGate, NeuralMemory
from tests.conftest import ROOT, run_oracle
from tests.tolerances import assert_close

B, T, H, K = 2, 13, 2, 4


def gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def dgelu(x):
  t = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)


def forward(Ws, x, ln, eps=1e-6):
  """(output, the activations for the backward) of one head's memory MLP (+ residual norm)."""
  zs, h = [], x
  for i, w in enumerate(Ws):
    z = h @ w
    zs.append((h, z))
    h = gelu(z) if i + 1 < len(Ws) else z
  if ln is None:
    return h, (zs, None)
  mu, var = h.mean(), ((h - h.mean()) ** 2).mean()
  xhat, sd = (h - mu) / np.sqrt(var + eps), np.sqrt(var + eps)
  return x + xhat * ln[0] + ln[1], (zs, (xhat, sd))


def grad(Ws, k, v, ln):
  """∇_W ‖M_W(k) − v‖² by backprop."""
  y, (zs, norm) = forward(Ws, k, ln)
  d = 2 * (y - v)
  if norm is not None:  # through x + LN(h)·γ + b: dh = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ
    xhat, sd = norm
    dx = d * ln[0]
    d = (dx - dx.mean() - xhat * (dx * xhat).mean()) / sd
  gs = [None] * len(Ws)
  for i in reversed(range(len(Ws))):
    h, z = zs[i]
    if i + 1 < len(Ws):
      d = d * dgelu(z)
    gs[i] = np.outer(h, d)
    d = d @ Ws[i].T
  return gs


def transcription(W0, q, k, v, theta, eta, alpha, pos, seg, chunk, ln=None, max_norm=None):
  """Eq. 10-15 token by token for every row and head: g at the weights of the chunk's start."""
  b, t, h, _ = q.shape
  y = np.zeros(q.shape)
  for r in range(b):
    for j in range(h):
      W = S = R = None
      for i in range(t):
        if seg[r, i] == 0:
          continue
        if pos[r, i] == 0:
          W, S = [w[j].copy() for w in W0], [np.zeros_like(w[j]) for w in W0]
        if pos[r, i] % chunk == 0:
          R = [w.copy() for w in W]
        lnj = None if ln is None else (ln[0][j], ln[1][j])
        g = grad(R, k[r, i, j], v[r, i, j], lnj)
        if max_norm is not None:
          n = math.sqrt(sum((x * x).sum() for x in g))
          g = [x * min(1.0, max_norm / n) for x in g]
        S = [eta[r, i, j] * s - theta[r, i, j] * x for s, x in zip(S, g)]
        W = [(1 - alpha[r, i, j]) * w + s for w, s in zip(W, S)]
        y[r, i, j] = forward(W, q[r, i, j], lnj)[0]
  return y


def data(seed=0, b=B, t=T, h=H, kd=K):
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s)  # noqa: E731
  q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (n(b, t, h, kd), n(b, t, h, kd)))
  gates = [rng.uniform(lo, hi, (b, t, h)) for lo, hi in ((0.02, 0.2), (0.3, 0.95), (0.0, 0.2))]
  pos, seg = np.tile(np.arange(t), (b, 1)), np.ones((b, t), np.int64)
  pos[1, 6:], seg[1, 6:] = np.arange(t - 6), 2  # row 1: a second document from token 6
  pos[0, :2], seg[0, :2] = 0, 0  # row 0: two tokens of left padding
  pos[0, 2:] = np.arange(t - 2)
  return q, k, n(b, t, h, kd), *gates, pos, seg


def layer(depth=2, chunk=4, residual_norm=False, max_grad_norm=None, **kw):
  return NeuralMemory(d_model=8, n_heads=H, head_dim=K, depth=depth, chunk=chunk, residual_norm=residual_norm,
                      max_grad_norm=max_grad_norm, dtype="float64", rngs=nnx.Rngs(0), **kw)


def run(m, q, k, v, theta, eta, alpha, pos, seg, state=None):
  ctx = TokenContext(jnp.zeros(pos.shape, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))
  arr = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
  return m.memory(*map(arr, (q, k, v, theta, eta, alpha)), ctx, state)


@pytest.mark.parametrize("depth, chunk, residual_norm, max_grad_norm",
                         [(1, 1, False, None), (2, 1, False, None), (2, 4, False, None), (3, 5, True, None),
                          (1, 4, True, None), (2, 4, False, 0.3)],
                         ids=["linear-c1", "mlp-c1", "mlp-c4", "mlp3-norm-c5", "linear-norm-c4", "mlp-c4-clip"])
def test_matches_float64_transcription(depth, chunk, residual_norm, max_grad_norm):
  with jax.enable_x64(True):
    m = layer(depth, chunk, residual_norm, max_grad_norm)
    x = data()
    if residual_norm:  # a gain and bias away from their init, so the norm's backward is exercised
      m.ln_gain[...] = m.ln_gain[...] + 0.3 * jax.random.normal(jax.random.key(1), m.ln_gain.shape)
      m.ln_bias[...] = 0.1 * jax.random.normal(jax.random.key(2), m.ln_bias.shape)
    y, _ = run(m, *x)
    W0 = [np.asarray(w[...], np.float64) for w in m.W0]
    ln = (np.asarray(m.ln_gain[...]), np.asarray(m.ln_bias[...])) if residual_norm else None
    want = transcription(W0, *x, chunk, ln, max_grad_norm)
  valid = (x[-1] > 0)[..., None, None]
  y = np.where(valid, np.asarray(y), 0.0)
  print(f"max |y - numpy| = {np.abs(y - want).max():.2e} (max |y| {np.abs(want).max():.2f})")
  np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_chunk_start_gradients_differ_from_per_token():
  """The chunk size is the semantics (mini-batch gradients at the chunk's start), not an implementation detail."""
  with jax.enable_x64(True):
    y1, _ = run(layer(chunk=1), *data())
    y4, _ = run(layer(chunk=4), *data())
  assert np.abs(np.asarray(y1) - np.asarray(y4)).max() > 1e-3


def test_heads_are_independent():
  """Head 1's keys and values change nothing of head 0 (state and reads, bit for bit), and the outer gradient of head
  0's read reaches only head 0's slice of the initial weights."""
  with jax.enable_x64(True):
    m = layer(chunk=4)
    x = list(data())
    y, s = run(m, *x)
    x[1], x[2] = x[1].copy(), x[2].copy()
    x[1][:, :, 1] = x[1][:, :, 1][:, ::-1]
    x[2][:, :, 1] += 1.0
    y2, s2 = run(m, *x)
    np.testing.assert_array_equal(np.asarray(y)[:, :, 0], np.asarray(y2)[:, :, 0])
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s2)):
      np.testing.assert_array_equal(np.asarray(a)[:, 0], np.asarray(b)[:, 0])
    assert np.abs(np.asarray(y)[:, :, 1] - np.asarray(y2)[:, :, 1]).max() > 1e-3
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def head0(params):
      return jnp.sum(run(nnx.merge(graphdef, params, rest), *data())[0][:, :, 0] ** 2)

    g = jax.grad(head0)(params)
  for w in g["W0"].values():
    assert np.abs(np.asarray(w[...])[0]).max() > 0 and not np.asarray(w[...])[1:].any()


def test_a_read_does_not_write():
  with jax.enable_x64(True):
    m = layer()
    x = list(data())
    y, s = run(m, *x)
    x[0] = x[0][:, ::-1]
    y2, s2 = run(m, *x)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s, s2)
  assert np.abs(np.asarray(y) - np.asarray(y2)).max() > 1e-3


def test_a_sequence_shorter_than_a_chunk_updates():
  with jax.enable_x64(True):
    m = layer(chunk=16)
    _, s = run(m, *(a[:, :5] for a in data()))
    for w, w0 in zip(s["W"], m.W0):
      assert np.abs(np.asarray(w)[1] - np.asarray(w0[...])).max() > 1e-3


@pytest.mark.parametrize("splits", [(5,), (1, 2, 3), (3, 4, 9, 10)])
def test_a_split_prompt_gives_the_state_of_the_whole(splits):
  """Calls ending anywhere in a memory chunk (chunk 4) carry what the next needs: outputs and states of the
  pieces are those of one call, to float64 rounding."""
  with jax.enable_x64(True):
    m = layer(chunk=4)
    x = data()
    y, s = run(m, *x)
    init = {n: tuple(jnp.zeros((B, *w.shape), jnp.float64) for w in m.W0) for n in ("W", "S", "R")}
    ys, st, edges = [], init, (0, *splits, T)
    for a, b in zip(edges[:-1], edges[1:]):
      yp, st = run(m, *(z[:, a:b] for z in x), st)
      ys.append(np.asarray(yp))
  np.testing.assert_allclose(np.concatenate(ys, 1), np.asarray(y), rtol=1e-12, atol=1e-13)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13), st, s)


def test_ablation_fiddler_reaches_every_memory():
  for name in ("titans_lmm_tiny", "titans_mag_tiny", "titans_mal_tiny"):
    cfg = cli.build_config([f"config:{name}", "fiddler:titans(momentum=False, decay=False, depth=1)"])
    mixers = [cfg.model.sequence_mixer, *(o.sequence_mixer for o in cfg.model.overrides)]
    mems = [b.memory if b.__fn_or_cls__ is MemoryAsGate else b for b in mixers]
    mems = [b for b in mems if b.__fn_or_cls__ is NeuralMemory]
    assert mems and all((b.momentum, b.decay, b.depth) == (False, False, 1) for b in mems)
  with pytest.raises(ValueError, match="no Titans memory"):
    cli.build_config(["config:tiny", "fiddler:titans"])


def test_no_momentum_no_decay_zero_their_gates():
  """momentum=False, decay=False: ``η = α = 0`` (``W_t = W_{t−1} − θ_t g_t``, the transcription's case above with
  those gates), θ untouched."""
  with jax.enable_x64(True):
    m = layer(chunk=1, momentum=False, decay=False)
    pos, seg = data()[-2:]
    xin = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, 8)))
    ctx = TokenContext(jnp.zeros((B, T), jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))
    _, _, _, theta, eta, alpha, _ = m.inputs(xin, ctx)
  assert not np.asarray(eta).any() and not np.asarray(alpha).any() and np.asarray(theta).min() > 0


@pytest.mark.oracle
def test_matches_fla_naive_titans(tmp_path):
  """fla 0.6.0 ``ops/titans/naive.py`` (linear memory, ``x + LN(xM)·w + b``; the token loop and its chunked dual
  form) with its two defects repaired by the oracle (experiments/oracles/fla_titans.py: the LayerNorm backward's
  parenthesis, and the read's residual ``qM`` where the trained memory's is ``q``), against the linear
  ``residual_norm`` memory; the unrepaired file disagrees (printed)."""
  b, t, h, kd, c = 2, 16, 2, 4, 4
  q, k, v, theta, eta, alpha, _, _ = data(5, b, t, h, kd)
  with jax.enable_x64(True):
    m = layer(depth=1, chunk=c, residual_norm=True)
    m.ln_gain[...] = 1 + 0.3 * jax.random.normal(jax.random.key(1), m.ln_gain.shape)
    m.ln_bias[...] = 0.1 * jax.random.normal(jax.random.key(2), m.ln_bias.shape)
    pos, seg = np.tile(np.arange(t), (b, 1)), np.ones((b, t), np.int64)
    y, s = run(m, q, k, v, theta, eta, alpha, pos, seg)
    W0 = np.asarray(m.W0[0][...], np.float64)
  np.savez(tmp_path / "in.npz", q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, chunk=c,
           w=np.asarray(m.ln_gain[...]), b=np.asarray(m.ln_bias[...]), M0=np.broadcast_to(W0, (b, *W0.shape)))
  run_oracle(str(ROOT / "experiments/oracles/fla_titans.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
  out = np.load(tmp_path / "out.npz")
  for form in ("loop", "chunk"):
    print(f"{form}: max |y - fla| = {np.abs(np.asarray(y) - out[f'{form}/o']).max():.2e}, "
          f"max |M - fla| = {np.abs(np.asarray(s['W'][0]) - out[f'{form}/M']).max():.2e} "
          f"(unrepaired fla: {np.abs(np.asarray(y) - out[f'{form}/o_unrepaired']).max():.2e})")
    assert_close(np.asarray(y), out[f"{form}/o"], np.float64, terms=t * kd * kd)
    assert_close(np.asarray(s["W"][0]), out[f"{form}/M"], np.float64, terms=t * kd * kd)
    assert np.abs(np.asarray(y) - out[f"{form}/o_unrepaired"]).max() > 1e-3


def test_persistent_pairs_are_seen_by_every_query():
  """Attention's persistent memory (Titans eq. 19): every real token, a document's first included, reads the learned
  pairs (changing them changes every output); ``persistent=0`` builds no such parameters."""
  from pmem.layers.attention import Attention
  att = Attention(16, 2, 2, window=4, persistent=3, rngs=nnx.Rngs(0))
  pos, seg = np.tile(np.arange(8), (2, 1)), np.ones((2, 8), np.int32)
  pos[1, 5:] = np.arange(3)
  ctx = TokenContext(jnp.zeros((2, 8), jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  y = att(x, ctx)
  att.pv[...] = att.pv[...] + 1.0
  assert (np.abs(np.asarray(att(x, ctx) - y)).max(-1) > 1e-4).all()
  assert not hasattr(Attention(16, 2, 2, rngs=nnx.Rngs(0)), "pk")
