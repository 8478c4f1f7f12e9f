"""B'MOJO (pmem.layers.bmojo): the mixer against an independent float64 NumPy transcription token by token (the
SSM, the innovation test, the FIFO store, attention over [fading ‖ store ‖ window]); the decode state's store holds
only selected tokens out of the window, at most N, the last ones; the special cases (no SSM, no store: Attention
bit for bit; window 0, no store: the SSM alone); bad sizes refused; the parameters counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmem.core.mixer import TokenContext
from pmem.layers.attention import Attention
from pmem.layers.bmojo import BMojo
from pmem.layers.deltanet import GatedDeltaNet
from pmem.train.loop import count_params
from tests.tolerances import assert_close

D, H, KV, T = 32, 4, 2, 29  # head_dim 8, GQA; T: documents longer than window + store


def layout():
  """positions / segment_ids [2, T]: two packed documents (the second from 12); 3 padding tokens, one document."""
  pos, seg = np.tile(np.arange(T), (2, 1)), np.ones((2, T), np.int64)
  pos[0, 12:], seg[0, 12:] = np.arange(T - 12), 2
  pos[1, :3], seg[1, :3], pos[1, 3:] = 0, 0, np.arange(T - 3)
  return pos, seg


def ctx(pos, seg, a=0, b=None):
  return TokenContext(None, jnp.asarray(pos[:, a:b], jnp.int32), jnp.asarray(seg[:, a:b], jnp.int32), {})


def perturbed(m, seed=1):
  leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))
  return m, np.asarray(jax.random.normal(jax.random.key(2), (2, T, D)))


def rope(x, p, theta=10000.0):
  h = x.shape[-1]
  ang = p * theta ** (-np.arange(0, h, 2) / h)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def reference(m, x, pos, seg):
  """The module docstring's equations in float64 NumPy, one token at a time, the store an explicit FIFO list
  → (y [B, T, D], selected [B, T])."""
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  a, s = w["attn"], w.get("ssm")
  hd, n_rep, W, N = m.attn.head_dim, H // KV, m.window, m.store
  y, sel = np.zeros_like(x), np.zeros(seg.shape, bool)
  sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
  l2 = lambda u: u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6)  # noqa: E731
  for b in range(x.shape[0]):
    toks, store = [], []
    for t in range(x.shape[1]):
      if seg[b, t] == 0:
        continue
      xt, p = x[b, t], pos[b, t]
      if p == 0:
        toks, store, S = [], [], np.zeros((H, hd, hd))
      keys = []
      if s is not None:
        q_ = l2((xt @ s["wq"]).reshape(H, hd)) * hd ** -0.5
        k_, v_ = l2((xt @ s["wk"]).reshape(H, hd)), (xt @ s["wv"]).reshape(H, hd)
        beta, g = sig(xt @ s["wb"]), np.exp(-np.exp(s["A_log"]) * np.logaddexp(0, xt @ s["w_alpha"] + s["dt_bias"]))
        pred = g[:, None] * np.einsum("hkv,hk->hv", S, k_)
        sel[b, t] = np.linalg.norm(v_ - pred) / (np.linalg.norm(v_) + 1e-6) > m.threshold
        S = g[:, None, None] * S + beta[:, None, None] * k_[:, :, None] * (v_ - pred)[:, None, :]
        o = np.einsum("hkv,hk->hv", S, q_)
        o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-6) * s["norm"]
        o = o * (lambda u: u * sig(u))(xt @ s["wg"]).reshape(H, hd)
        f = o.reshape(-1) @ s["wo"]
        keys.append((rope(np.einsum("d,dkh->kh", f, a["wk"]), p), np.einsum("d,dkh->kh", f, a["wv"])))
      toks.append((p, rope(np.einsum("d,dkh->kh", xt, a["wk"]), p), np.einsum("d,dkh->kh", xt, a["wv"]), sel[b, t]))
      while toks and W is not None and p - toks[0][0] >= W:  # leaves the window: to the store if selected
        left = toks.pop(0)
        store = (store + [left])[-N:] if left[3] and N else store
      keys += [(k, v) for _, k, v, _ in store + toks]
      K_, V_ = np.stack([k for k, _ in keys]), np.stack([v for _, v in keys])  # [S, KV, hd]
      q = rope(np.einsum("d,dnh->nh", xt, a["wq"]), p)
      sc = np.einsum("nh,snh->ns", q, np.repeat(K_, n_rep, 1)) * hd ** -0.5
      pr = np.exp(sc - sc.max(-1, keepdims=True))
      o = np.einsum("ns,snh->nh", pr / pr.sum(-1, keepdims=True), np.repeat(V_, n_rep, 1))
      y[b, t] = np.einsum("nh,nhd->d", o, a["wo"])
  return y, sel


def run64(m, x, c, state=None):
  return m(jnp.asarray(x), c) if state is None else m(jnp.asarray(x), c, state)


@pytest.mark.parametrize("kw", [{}, {"window": 5, "store": 3}, {"store": 0}, {"window": 0, "store": 0}])
def test_mixer_equals_the_numpy_transcription(kw):
  pos, seg = layout()
  with jax.enable_x64(True):
    m, x = perturbed(BMojo(D, H, KV, **kw, chunk=8, dtype="float64", rngs=nnx.Rngs(0)))
    nnx.update(m, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(m)))
    got = np.asarray(run64(m, x, ctx(pos, seg)))
  want, sel = reference(m, x, pos, seg)
  real = seg > 0
  assert_close(got[real], want[real], dtype=np.float64, terms=4 * T + D)
  if m.store:
    assert 0 < sel.sum() < real.sum()  # the threshold selects some tokens, not all


def test_the_store_holds_the_last_n_selected_tokens_out_of_the_window():
  """Prefill 6, then one token at a time: after each call the store's slots are exactly the last N selected
  tokens (innovation above τ in the NumPy transcription) that have left the ring, at most N of them."""
  pos, seg = layout()
  W, N = 5, 3
  m, x = perturbed(BMojo(D, H, KV, window=W, store=N, chunk=8, rngs=nnx.Rngs(0)))
  _, sel = reference(m, np.asarray(x, np.float64), pos, seg)
  state = m.init_state(2, 64)
  cuts = [0, 6, *range(7, T + 1)]
  for a, b in zip(cuts[:-1], cuts[1:]):
    _, state = m(jnp.asarray(x[:, a:b]), ctx(pos, seg, a, b), state)
    st = jax.tree.map(np.asarray, state["store"])
    for r in range(2):
      held = {(int(sg), int(p)) for sg, p in zip(st["seg"][r], st["pos"][r]) if sg > 0}
      out = [(int(seg[r, i]), int(pos[r, i])) for i in range(b - W) if sel[r, i]]  # left the ring, selected
      assert held == set(out[len(out) - N:] if len(out) > N else out), (b, r)
      assert len(held) <= N
  assert sel.sum() > N  # the FIFO evicted some


def test_without_ssm_and_store_it_is_sliding_window_attention_bit_for_bit():
  pos, seg = layout()
  for window in (6, None):
    attn, x = perturbed(Attention(D, H, KV, window=window, rngs=nnx.Rngs(0)))
    m = BMojo(D, H, KV, window=window, store=0, ssm=False, rngs=nnx.Rngs(3))
    nnx.update(m.attn, nnx.state(attn))
    run = lambda mod, *a: jax.jit(lambda s, *a: nnx.merge(nnx.graphdef(mod), s)(*a))(nnx.state(mod), *a)  # noqa: E731
    np.testing.assert_array_equal(run(m, jnp.asarray(x), ctx(pos, seg)), run(attn, jnp.asarray(x), ctx(pos, seg)))


def test_window_0_without_store_is_the_ssm_alone():
  """y = W_o W_v GDN(x) (softmax over the fading token alone), whatever the attention's q and k."""
  pos, seg = layout()
  m, x = perturbed(BMojo(D, H, KV, window=0, store=0, chunk=8, rngs=nnx.Rngs(0)))
  gdn = GatedDeltaNet(D, H, conv=0, chunk=8, rngs=nnx.Rngs(0))
  nnx.update(gdn, nnx.state(m.ssm))
  f = np.asarray(gdn(jnp.asarray(x), ctx(pos, seg)), np.float64)
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(m.attn, nnx.Param)))
  want = np.einsum("btnh,nhd->btd", np.repeat(np.einsum("btd,dkh->btkh", f, w["wv"]), H // KV, 2), w["wo"])
  got = np.asarray(m(jnp.asarray(x), ctx(pos, seg)))
  real = seg > 0
  assert_close(got[real], want[real], terms=2 * D)
  m.attn.wq[...] = m.attn.wq[...] * 3.0
  np.testing.assert_allclose(np.asarray(m(jnp.asarray(x), ctx(pos, seg)))[real], got[real], rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [({"window": -1}, "window must be >= 0"), ({"store": -2}, "store must be >= 0"),
                                       ({"window": None}, "needs a window"), ({"ssm": False}, "needs a window"),
                                       ({"window": 0, "store": 0, "ssm": False}, "attends to nothing")])
def test_bad_sizes_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    BMojo(D, H, KV, **kw, rngs=nnx.Rngs(0))


def test_cost_counts_the_parameters_and_the_state_is_constant_in_max_len():
  m = BMojo(D, H, KV, rngs=nnx.Rngs(0))
  assert m.cost(64).params == count_params(nnx.state(m, nnx.Param))
  size = lambda n: sum(a.size for a in jax.tree.leaves(m.init_state(2, n)))  # noqa: E731
  assert size(64) == size(4096)
