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


# lucidrains' titans-pytorch NeuralMemory (experiments/oracles/titans_pytorch.py)

TP_CASES = [(h, depth, chunk, momentum) for h in (1, 2) for depth in (1, 2) for chunk in (1, 4)
            for momentum in (True, False)]
TP_B, TP_T, TP_D = 2, 10, 8  # chunk 4: two whole chunks and a partial one


def tp_name(h, depth, chunk, momentum):
  return f"h{h}-depth{depth}-c{chunk}-{'momentum' if momentum else 'plain'}"


@pytest.fixture(scope="module")
def titans_pytorch_reads(tmp_path_factory):
  """{case: (pmem's reads, titans-pytorch's, its default chunking's)} from one oracle run; pmem's layer without the
  short conv (titans-pytorch has none) or clipping (its clamp is another function), float64."""
  import subprocess

  from tests.conftest import ORACLE_PYTHON
  find = "import importlib.util, sys; sys.exit(importlib.util.find_spec('titans_pytorch') is None)"
  if ORACLE_PYTHON.exists() and subprocess.run([str(ORACLE_PYTHON), "-c", find]).returncode:
    pytest.skip(f"the oracle venv {ORACLE_PYTHON} lacks titans_pytorch; `make oracle` installs it")
  tmp = tmp_path_factory.mktemp("titans_pytorch")
  ys, arrays = {}, {}
  rng = np.random.default_rng(7)
  pos, seg = np.tile(np.arange(TP_T), (TP_B, 1)), np.ones((TP_B, TP_T), np.int32)
  ctx = TokenContext(jnp.zeros(pos.shape, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))
  with jax.enable_x64(True):
    for i, (h, depth, chunk, momentum) in enumerate(TP_CASES):
      m = NeuralMemory(TP_D, h, depth=depth, chunk=chunk, conv=0, max_lr=0.2, max_grad_norm=None, momentum=momentum,
                       dtype="float64", rngs=nnx.Rngs(i))  # max_lr 0.2: an inner loop that does not diverge unclipped
      x = rng.standard_normal((TP_B, TP_T, TP_D))
      q, k, v, theta, eta, alpha, _ = m.inputs(jnp.asarray(x), ctx)
      name = tp_name(h, depth, chunk, momentum)
      ys[name] = np.asarray(m.memory(q, k, v, theta, eta, alpha, ctx, None)[0])
      w = {n: getattr(m, n)[...] for n in ("wq", "wk", "wv", "w_gates", "b_gates")}
      w |= {f"W0_{j}": w0[...] for j, w0 in enumerate(m.W0)}
      arrays |= {f"{name}/{n}": np.asarray(a, np.float64) for n, a in w.items()}
      arrays |= {f"{name}/x": x, f"{name}/chunk": chunk, f"{name}/momentum": momentum, f"{name}/max_lr": m.max_lr}
  np.savez(tmp / "in.npz", **arrays)
  run_oracle(str(ROOT / "experiments/oracles/titans_pytorch.py"), str(tmp / "in.npz"), str(tmp / "out.npz"))
  out = np.load(tmp / "out.npz")
  return {n: (y, out[f"{n}/y"], out[f"{n}/y_default"]) for n, y in ys.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("case", TP_CASES, ids=[tp_name(*c) for c in TP_CASES])
def test_matches_titans_pytorch(titans_pytorch_reads, case):
  """titans-pytorch 0.5.5's ``NeuralMemory`` configured to pmem's semantics (its ``batch_size`` = pmem's memory chunk,
  its ``chunk_size`` 1; the mapping in experiments/oracles/titans_pytorch.py) reads what pmem's memory reads, every
  token, heads 1 / 2, linear / MLP memory, chunk 1 / 4 (a final partial chunk), momentum on / off; its default
  chunking (``chunk_size`` = the chunk, every gradient at the initial weights, chunk-mean gates) does not."""
  h, depth, chunk, momentum = case
  y, want, default = titans_pytorch_reads[tp_name(*case)]
  w = sum(i * o for i, o in zip((TP_D // h, *[2 * TP_D // h] * (depth - 1)), (*[2 * TP_D // h] * (depth - 1), TP_D // h)))
  print(f"max |y - titans-pytorch| = {np.abs(y - want).max():.2e} (max |y| {np.abs(want).max():.2f}); "
        f"its default chunking: {np.abs(y - default).max():.2e}")
  assert_close(y, want, np.float64, terms=TP_T * w)
  assert np.abs(y - default).max() > 1e-3


# Titans memory as context (MemoryAsContext, `titans_mac`)

import functools  # noqa: E402

from pmem.memory.titans import MemoryAsContext  # noqa: E402

MAC_B, MAC_T, MAC_D, MAC_H, MAC_KV, MAC_P, MAC_C = 2, 10, 8, 2, 1, 2, 3  # 2 heads of 4, one kv head, segments of 3


def mac_layer(perturb=True, **memory):
  """A float64 MAC of 2 heads (GQA: one kv head), 2 persistent pairs, segments of 3; ``memory``: the LMM's knobs;
  ``perturb``: every parameter moved off its init (gates, convs, persistent pairs)."""
  m = MemoryAsContext(MAC_D, MAC_H, MAC_KV, persistent=MAC_P, chunk=MAC_C, dtype="float64", rngs=nnx.Rngs(0),
                      memory=functools.partial(NeuralMemory, **memory))
  if perturb:
    rng = np.random.default_rng(4)
    nnx.update(m, jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape)),
                               nnx.state(m, nnx.Param)))
  return m


def mac_stream(seed=0):
  """x, positions, segment ids: row 0 two tokens of left padding, then a document of 8 (segments 3, 3, 2); row 1
  two documents of 5 (segments 3, 2)."""
  x = np.random.default_rng(seed).standard_normal((MAC_B, MAC_T, MAC_D))
  pos = np.array([[0, 0, *range(8)], [*range(5), *range(5)]])
  seg = np.array([[0, 0, *[1] * 8], [1] * 5 + [2] * 5])
  return x, pos, seg


@functools.partial(jax.jit, static_argnames=("graphdef", "fn"))
def _mac_apply(graphdef, params, x, pos, seg, state, fn):
  m = nnx.merge(graphdef, params)
  return getattr(m, fn)(x, TokenContext(None, pos, seg), state)


def mac_run(m, x, pos, seg, state=None, fn="__call__"):
  """``m(x, ctx, state)`` (``fn="mix"``: ``m.mix``; ``state=None`` there: an empty one), jitted per module structure
  (one compile for the calls of a test)."""
  graphdef, params = nnx.split(m)
  if fn == "mix" and state is None:
    state = m.init_state(x.shape[0], x.shape[1], "float64")
  return _mac_apply(graphdef, params, jnp.asarray(x), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32),
                    state, fn)


def rope(x, p, theta=10000.0):
  """RoPE, rotate-half pairs (i, i + H/2) at position p."""
  h = x.shape[-1]
  ang = p * theta ** (-np.arange(0, h, 2) / h)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def mac_transcription(m, x, pos, seg):
  """Eq. 21-25 token by token (the class docstring), from the module's parameters as NumPy: per document, per
  segment of ``chunk`` positions, h_t = M_R(q(x_t)) with R the weights at the segment's start; attention of q_t
  over the persistent pairs, the segment's h tokens and tokens up to t; the write of ỹ_t by `grad` above at R;
  o_t = W_o (RMS(M_W(q(ỹ_t)))·γ ⊙ SiLU(ỹ_t W_g)). Returns (y, h, the final W per row)."""
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(m)))
  at, mem = P["attn"], P["lmm"]
  d, n, hd = at["wq"].shape
  nkv, hh, kd, c, clip_at = at["wk"].shape[1], m.lmm.n_heads, m.lmm.head_dim, m.chunk, m.lmm.max_grad_norm
  W0 = [mem["W0"][i] for i in range(len(mem["W0"]))]
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  silu = lambda z: z * sig(z)  # noqa: E731
  l2 = lambda z: z / np.sqrt((z * z).sum(-1, keepdims=True) + 1e-6)  # noqa: E731

  def lmm_in(hist, name):  # the LMM's projection `name` of the stream's last token: causal conv in the document, SiLU
    if name not in mem.get("convs", {}):  # no short conv: the projection alone
      return (hist[-1] @ mem[f"w{name}"]).reshape(hh, kd)
    w = mem["convs"][name]["w"]
    z = sum(w[j] * (hist[-1 - j] @ mem[f"w{name}"]) for j in range(min(len(w), len(hist))))
    return silu(z).reshape(hh, kd)

  def heads(Ws, q):  # M_W(q) per head
    return np.stack([forward([w[j] for w in Ws], q[j], None)[0] for j in range(hh)])

  y, h_all, W_end = np.zeros(x.shape), np.zeros((*x.shape[:2], hh, kd)), []
  for r in range(x.shape[0]):
    for i in range(x.shape[1]):
      if seg[r, i] == 0:
        continue
      p = pos[r, i]
      if p == 0:  # a document: initial weights, no momentum, no history
        W, S, xs, ys = [w.copy() for w in W0], [np.zeros_like(w) for w in W0], [], []
      if p % c == 0:  # a segment: its start weights, an empty context
        R, ctx = [w.copy() for w in W], []
      xs.append(x[r, i])
      h = heads(R, l2(lmm_in(xs, "q")))  # eq. 21
      h_all[r, i] = h
      qa = rope((x[r, i] @ at["wq"].reshape(d, -1)).reshape(n, hd), p)
      ctx.append([rope((h.reshape(d) @ at["wk"].reshape(d, -1)).reshape(nkv, hd), p),
                  (h.reshape(d) @ at["wv"].reshape(d, -1)).reshape(nkv, hd),
                  rope((x[r, i] @ at["wk"].reshape(d, -1)).reshape(nkv, hd), p),
                  (x[r, i] @ at["wv"].reshape(d, -1)).reshape(nkv, hd)])
      o = np.zeros((n, hd))
      for a in range(n):  # eq. 22-23: [persistent ‖ h ‖ segment], causal in the segment
        g = a // (n // nkv)
        keys = np.concatenate([at["pk"][:, g], [e[0][g] for e in ctx], [e[2][g] for e in ctx]])
        vals = np.concatenate([at["pv"][:, g], [e[1][g] for e in ctx], [e[3][g] for e in ctx]])
        s = keys @ qa[a] / math.sqrt(hd)
        pr = np.exp(s - s.max())
        o[a] = (pr / pr.sum()) @ vals
      yt = o.reshape(-1) @ at["wo"].reshape(-1, d)
      ys.append(yt)
      qy, ky, vy = l2(lmm_in(ys, "q")), l2(lmm_in(ys, "k")), lmm_in(ys, "v")
      theta, eta, alpha = sig(yt @ mem["w_gates"] + mem["b_gates"]).reshape(3, hh) * np.array([[m.lmm.max_lr], [1], [1]])
      for j in range(hh):  # eq. 24: the gradient at the segment's start weights, momentum, forgetting
        gj = grad([w[j] for w in R], ky[j], vy[j], None)
        gj = [gl * min(1.0, clip_at / math.sqrt(sum((a * a).sum() for a in gj))) for gl in gj]  # clipped
        for layer_, gl in enumerate(gj):
          S[layer_][j] = eta[j] * S[layer_][j] - theta[j] * gl
          W[layer_][j] = (1 - alpha[j]) * W[layer_][j] + S[layer_][j]
      rd = heads(W, qy)  # eq. 25: the read with the updated weights, the LMM's gate and output projection
      rd = rd / np.sqrt((rd * rd).mean(-1, keepdims=True) + 1e-6) * mem["norm"]
      y[r, i] = (rd * silu(yt @ mem["wg"]).reshape(hh, kd)).reshape(-1) @ mem["wo"]
    W_end.append(W)
  return y, h_all, W_end


def test_mac_matches_float64_transcription():
  """MAC against its transcription: packed documents, left padding, segments cut short at a document's end (whose
  writes already reached the state), depth-2 memory, short convs of 3 on both streams, clipped inner gradients, GQA,
  persistent pairs."""
  with jax.enable_x64(True):
    m = mac_layer(conv=3)
    x, pos, seg = mac_stream()
    y, state = mac_run(m, x, pos, seg, m.init_state(MAC_B, MAC_T, "float64"))
    want, _, want_W = mac_transcription(m, x, pos, seg)
  real = seg > 0
  w = sum(a * b for a, b in zip(m.lmm.dims[:-1], m.lmm.dims[1:]))
  terms = MAC_T * (MAC_D + MAC_P + 2 * MAC_C + w)  # a recurrence over the tokens of reductions of these lengths
  y = np.asarray(y)
  print(f"max |y - numpy| = {np.abs(y[real] - want[real]).max():.2e} (max |y| {np.abs(want).max():.2f})")
  assert_close(y[real], want[real], np.float64, terms=terms)
  for r in range(MAC_B):
    for got, ref, w0 in zip(state["W"], want_W[r], m.lmm.W0):
      assert_close(np.asarray(got)[r], ref, np.float64, terms=terms)
      assert np.abs(ref - np.asarray(w0[...])).max() > 1e-3


def test_mac_reads_follow_the_segments():
  """A token perturbed in segment 1 (position 4, the middle) of row 0 changes no read h in segments 0 and 1 but its
  own (no short conv: a read's query is its token's; the other reads take the segment-start weights, written by
  segment 0 only, bit for bit), every read of segment 2 (through the weights its write changed), ỹ from that token
  on (in its segment through the attention, after it through the reads), and nothing of row 1; the reads are the
  transcription's."""
  with jax.enable_x64(True):
    m = mac_layer(conv=0)
    x, pos, seg = mac_stream()
    x2 = x.copy()
    x2[0, 6] += 1.0  # row 0, position 4
    (yt, _, h, _), (yt2, _, h2, _) = (jax.tree.map(np.asarray, mac_run(m, a, pos, seg, fn="mix")) for a in (x, x2))
    want_h = mac_transcription(m, x, pos, seg)[1]
  same = [2, 3, 4, 5, 7]  # positions 0..5 but 4
  np.testing.assert_array_equal(h2[0, same], h[0, same])
  assert np.abs(h2[0, 6] - h[0, 6]).max() > 1e-3
  assert (np.abs(h2[0, 8:] - h[0, 8:]).max((-2, -1)) > 1e-6).all()  # both reads of segment 2
  np.testing.assert_array_equal(yt2[0, :6], yt[0, :6])
  assert (np.abs(yt2[0, 6:] - yt[0, 6:]).max(-1) > 1e-6).all()
  np.testing.assert_array_equal(h2[1], h[1])
  np.testing.assert_array_equal(yt2[1], yt[1])
  real = seg > 0
  assert_close(h[real], want_h[real], np.float64, terms=MAC_T * (MAC_D + MAC_P + 2 * MAC_C + 2 * MAC_D ** 2))


def test_mac_attention_stays_in_its_segment():
  """With a memory that never changes (θ = 0, no decay, no short conv) a token of segment 1 changes its segment's
  later outputs and nothing of segment 2, bit for bit (test_mac_reads_follow_the_segments: a memory that learns
  carries it); and a state's attention buffers, full of garbage at a segment start (row 0) or a document start
  (row 1), change nothing of what follows."""
  with jax.enable_x64(True):
    x, pos, seg = mac_stream()
    x2 = x.copy()
    x2[0, 6] += 1.0
    frozen = mac_layer(conv=0, max_lr=0.0, decay=False)
    y, y2 = (np.asarray(mac_run(frozen, a, pos, seg)) for a in (x, x2))
    m = mac_layer()
    _, state = mac_run(m, x[:, :5], pos[:, :5], seg[:, :5], m.init_state(MAC_B, MAC_T, "float64"))
    junk = {n: 1e3 * jax.random.normal(jax.random.key(5), state[n].shape, jnp.float64) for n in ("k", "v", "hk", "hv")}
    out, bad = (np.asarray(mac_run(m, x[:, 5:], pos[:, 5:], seg[:, 5:], s)[0]) for s in (state, {**state, **junk}))
  assert np.abs(y2[0, 6:8] - y[0, 6:8]).max() > 1e-3
  np.testing.assert_array_equal(y2[0, 8:], y[0, 8:])
  np.testing.assert_array_equal(bad, out)


def test_mac_fiddler_and_bad_sizes():
  cfg = cli.build_config(["config:titans_mac_tiny",
                          "fiddler:titans(momentum=False, decay=False, depth=1, chunk=4, persistent=2)"])
  mac = cfg.model.sequence_mixer
  assert (mac.chunk, mac.persistent) == (4, 2)
  assert (mac.memory.momentum, mac.memory.decay, mac.memory.depth) == (False, False, 1)
  for kw, match in (({"chunk": 0}, "chunk >= 1"), ({"persistent": -1}, "persistent >= 0"),
                    ({"n_heads": 3}, "n_heads dividing d_model"),
                    ({"memory": functools.partial(NeuralMemory, head_dim=2)}, "must be d_model=8")):
    with pytest.raises(ValueError, match=match):
      MemoryAsContext(**{"d_model": 8, "n_heads": 2, **kw}, rngs=nnx.Rngs(0))
