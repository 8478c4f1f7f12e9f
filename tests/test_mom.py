"""Mixture-of-Memories (pmem.layers.mom) and the auxiliary losses (pmem.core.auxiliary): one memory, top-1, no
shared memory is Gated DeltaNet bit for bit; the routing weights; the balance loss and the whole mixer against
independent float64 NumPy transcriptions (each memory's recurrence over its gathered routed tokens, as fla);
unrouted memories keep their state bit for bit; the balance loss reaches the training loss and the logs through
scanned, unrolled and rematerialized stages, and never the logits."""

import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core import auxiliary
from pmem.core.mixer import TokenContext
from pmem.layers import mom as mom_lib, recurrence
from pmem.layers.deltanet import GatedDeltaNet
from pmem.layers.mom import MoM, balance_loss
from pmem.models.decoder import Decoder, unstack
from pmem.train.loop import Trainer
from pmem.train.step import forward_loss
from tests.mixer_inputs import ctx, perturb
from tests.tolerances import assert_close

D, H, T = 32, 2, 37  # d_model, heads (head_dim 16), tokens: not a multiple of the chunks 8 and 64


def layout():
  """positions / segment_ids [3, T]: one document; two packed (the second from 13); 5 padding tokens."""
  pos, seg = np.tile(np.arange(T), (3, 1)), np.ones((3, T), np.int64)
  pos[1, 13:], seg[1, 13:] = np.arange(T - 13), 2
  pos[2, :5], seg[2, :5], pos[2, 5:] = 0, 0, np.arange(T - 5)
  return pos, seg


def perturbed(m, seed: int = 1):
  """``m`` with every parameter moved off its init (routers, gates, convs), and an input ``[3, T, D]``."""
  return perturb(m, 0.1, seed), np.asarray(jax.random.normal(jax.random.key(2), (3, T, D)))


def heads(S, m):
  """A state's ``[B, M·H, K, V]`` as ``[B, M, H, K, V]``."""
  return np.asarray(S).reshape(S.shape[0], m.memories, m.n_heads, *S.shape[2:])


def test_one_memory_top_1_without_shared_is_gated_deltanet():
  """Weight 1 = softmax of one logit, renormalised; every token routed; Σ over one memory: the same ops."""
  gdn, x = perturbed(GatedDeltaNet(D, H, chunk=8, rngs=nnx.Rngs(0)))
  m = MoM(D, H, n_memories=1, topk=1, shared=False, chunk=8, rngs=nnx.Rngs(0))
  nnx.update(m, nnx.state(gdn, nnx.Param))
  pos, seg = layout()
  run = lambda mod, *a: jax.jit(lambda s, *a: nnx.merge(nnx.graphdef(mod), s)(*a))(nnx.state(mod), *a)  # noqa: E731
  for c in (ctx(pos, seg), ctx(pos[:, :1], seg[:, :1])):  # the chunked form; one step on a state
    n = c.positions.shape[1]
    np.testing.assert_array_equal(run(m, x[:, :n], c), run(gdn, x[:, :n], c))
    state = jax.tree.map(lambda a: a + 0.5, gdn.init_state(3, 64))
    for got, want in zip(jax.tree.leaves(run(m, x[:, :n], c, state)), jax.tree.leaves(run(gdn, x[:, :n], c, state))):
      np.testing.assert_array_equal(got, want)


def test_routing_weights_sum_to_one_on_the_top_k():
  m, x = perturbed(MoM(D, H, n_memories=5, topk=2, rngs=nnx.Rngs(0)))
  p, w, routed = (np.asarray(a) for a in m.route(jnp.asarray(x).reshape(-1, D), 3, T))
  top = np.argsort(-p, -1)[..., :2]
  want = np.zeros_like(p)
  np.put_along_axis(want, top, np.take_along_axis(p, top, -1) / np.take_along_axis(p, top, -1).sum(-1, keepdims=True), -1)
  assert_close(w.sum(-1), np.ones((3, T)), terms=2)
  assert ((w > 0).sum(-1) == 2).all() and (routed == (w > 0)).all()
  assert_close(w, want, terms=2)
  assert len(np.unique(top[..., 0])) > 1  # the router does route


def numpy_balance(p, routed_slots, valid, E):
  """fla's ``load_balancing_loss_func`` for one layer with an attention mask, in NumPy: per slot the
  fraction of valid tokens routed to each memory [k, E], the mean router probability [E]; E · Σ their product."""
  mask = np.eye(E)[routed_slots] * valid[..., None, None]  # [B, T, k, E]
  tokens_per_memory = mask.sum((0, 1)) / valid.sum()
  prob_per_memory = (p * valid[..., None]).sum((0, 1)) / valid.sum()
  return E * np.sum(tokens_per_memory * prob_per_memory[None])


def test_balance_loss_equals_the_numpy_transcription():
  E, k = 6, 2
  r = np.random.default_rng(0)
  logits = r.normal(size=(3, T, E)) * 2
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  slots = np.argsort(-p, -1)[..., :k]
  routed = (np.eye(E)[slots].sum(-2) > 0)
  valid = layout()[1] > 0
  want = numpy_balance(p, slots, valid, E)
  with jax.enable_x64(True):
    got = float(balance_loss(jnp.asarray(p), jnp.asarray(routed), jnp.asarray(valid)))
  assert_close(got, want, dtype=np.float64, terms=3 * T)
  assert abs(numpy_balance(np.full((3, T, E), 1 / E), slots, valid, E) - k) < 1e-12  # uniform routing: k
  # through the module: 0.01 x the loss of its router, summed over its calls
  m, x = perturbed(MoM(D, H, n_memories=E, topk=k, rngs=nnx.Rngs(0)))
  pos, seg = layout()
  p, _, _ = m.route(jnp.asarray(x).reshape(-1, D), 3, T)
  p = np.asarray(p, np.float64)
  with auxiliary.collect() as got:
    m(jnp.asarray(x), ctx(pos, seg))
    m(jnp.asarray(x), ctx(pos, seg))
  assert_close(got["mom_balance"], 2 * 0.01 * numpy_balance(p, np.argsort(-p, -1)[..., :k], seg > 0, E), terms=3 * T)
  assert not auxiliary.active()
  m.balance = 0.0
  with auxiliary.collect() as got:
    m(jnp.asarray(x), ctx(pos, seg))
  assert got == {}


def silu(u):
  return u / (1 + np.exp(-u))


def l2(u):
  return u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6)


def reference(m, x, pos, seg):
  """``MoM.__call__`` in float64 NumPy from the module's parameters, fla's way: each memory's gated delta rule
  (fla's ``naive_recurrent_gated_delta_rule``, S [K, V]) over its gathered routed tokens in order, starting from
  zero at each new document → (out [b, T, d], final S [b, M, H, K, V], weights [b, T, M])."""
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  (b, t, _), E, M, K, V = x.shape, m.n_memories, m.memories, m.head_dim, m.value_dim
  lag = lambda u, j: np.pad(u, ((0, 0), (j, 0), (0, 0)))[:, :t]  # noqa: E731  u_{t−j}
  conv = lambda u, n: silu(sum(np.where((pos >= j)[..., None], lag(u, j), 0.0) * w["convs"][n]["w"][j]  # noqa: E731
                               for j in range(m.convs[n].width)))
  q = l2(conv(x @ w["wq"], "q").reshape(b, t, H, K)) * K ** -0.5
  k = l2(conv(x @ w["wk"], "k").reshape(b, t, M, H, K))
  v = conv(x @ w["wv"], "v").reshape(b, t, M, H, V)
  beta = 1 / (1 + np.exp(-(x @ w["wb"]).reshape(b, t, M, H)))
  g = np.exp(-np.exp(w["A_log"]) * np.logaddexp(0.0, (x @ w["w_alpha"]).reshape(b, t, M, H) + w["dt_bias"]))
  logits = x @ w["w_r"]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, -1)[..., :m.topk]
  wt = np.zeros((b, t, M))
  np.put_along_axis(wt, top, np.take_along_axis(p, top, -1) / np.take_along_axis(p, top, -1).sum(-1, keepdims=True), -1)
  wt[..., E:] = 1.0  # the shared memory: every token, unweighted
  doc = np.cumsum((pos == 0) & (seg > 0), 1)
  o, S = np.zeros((b, t, M, H, V)), np.zeros((b, M, H, K, V))
  for r in range(b):
    for mm in range(M):
      s, at = np.zeros((H, K, V)), None
      for i in [i for i in range(t) if seg[r, i] > 0 and wt[r, i, mm] > 0]:  # memory mm's routed tokens
        if doc[r, i] != at:
          s, at = np.zeros((H, K, V)), doc[r, i]
        s = g[r, i, mm][:, None, None] * s
        u = beta[r, i, mm][:, None] * (v[r, i, mm] - np.einsum("hk,hkv->hv", k[r, i, mm], s))
        s = s + k[r, i, mm][..., None] * u[:, None, :]
        o[r, i, mm] = np.einsum("hk,hkv->hv", q[r, i], s)
      S[r, mm] = s if at == doc[r, -1] else 0.0  # a document that started after its last token reset it
  y = np.einsum("btmhv,btm->bthv", o, wt)
  y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-6) * w["norm"]
  y = y * silu(x @ w["wg"]).reshape(b, t, H, V)
  return y.reshape(b, t, H * V) @ w["wo"], S, wt


# float64 both ways: the projections' D-products, the conv's 4 taps, the recurrence (2T + K: sums over <= T
# tokens under products of up to T decays; chunked: a chunk's triangular solve and exp of cumulative-decay
# differences over min(C, T) tokens), the combine over M memories, the RMSNorm's mean and the out-projection's
# H·V-products, 16 for the elementwise ops
def terms(c, M):
  return D + 4 + 2 * T + 16 + 2 * min(c, T) + M + 2 * H * 16 + 16


@pytest.mark.parametrize("chunk, shared", [(8, True), (64, False)])
def test_mixer_equals_the_float64_transcription(chunk, shared):
  m, x = perturbed(MoM(D, H, n_memories=4, topk=2, shared=shared, chunk=chunk, rngs=nnx.Rngs(0)))
  pos, seg = layout()
  real = seg > 0
  with jax.enable_x64(True):
    m64 = MoM(D, H, n_memories=4, topk=2, shared=shared, chunk=chunk, dtype="float64", rngs=nnx.Rngs(0))
    nnx.update(m64, jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), nnx.state(m, nnx.Param)))
    want, S, wt = reference(m64, x, pos, seg)
    assert (wt[real][:, :4] > 0).sum(0).min() > 5  # every memory is routed tokens
    y, s = m64(jnp.asarray(x), ctx(pos, seg), m64.init_state(3, 64))
    assert np.asarray(y).dtype == np.float64 and np.asarray(s["S"]).dtype == np.float64
    assert_close(np.asarray(m64(jnp.asarray(x), ctx(pos, seg)))[real], want[real], dtype=np.float64,
                 terms=terms(chunk, m.memories))
    assert_close(np.asarray(y)[real], want[real], dtype=np.float64, terms=terms(chunk, m.memories))
    assert_close(heads(s["S"], m), S, dtype=np.float64, terms=terms(chunk, m.memories))
  # float32 within the same count of float32 roundings
  assert_close(np.asarray(m(jnp.asarray(x, jnp.float32), ctx(pos, seg)))[real], want[real],
               terms=terms(chunk, m.memories), k=0.5)


def test_unrouted_memories_keep_their_state_bit_for_bit(monkeypatch):
  """Memory 3 is routed no token: its state leaves a prefill (chunked) and every decode step as it entered, bit
  for bit; the other memories' states equal ``recurrence.step`` over only their routed tokens (of the inputs the
  mixer handed the recurrence): within rounding after the chunked prefill, bit for bit token by token."""
  m, x = perturbed(MoM(D, H, n_memories=4, topk=2, chunk=8, rngs=nnx.Rngs(0)))
  x = np.abs(x[:2, :21])
  m.w_r[...] = m.w_r[...].at[:, 3].add(-10.0)  # with positive inputs, memory 3's logit is far below the others
  b, t, M, h = 2, 21, m.memories, m.n_heads
  pos, seg = np.tile(np.arange(5, 5 + t), (b, 1)), np.ones((b, t), np.int64)  # continues documents: no reset
  seen, recur = [], mom_lib.recur
  monkeypatch.setattr(mom_lib, "recur", lambda *a: (seen.append(a[:5]), recur(*a))[1])  # what the recurrence gets
  state = m.init_state(b, 64)
  state["S"] = jax.random.normal(jax.random.key(4), state["S"].shape)
  S0 = heads(state["S"], m)

  def gathered(S, calls):  # recurrence.step per memory over its routed tokens only (k ≠ 0 marks them)
    S = np.asarray(S).copy()
    for q, k, v, a, beta in calls:
      for i in range(q.shape[1]):
        for r in range(b):
          for mm in range(M):
            hs = slice(mm * h, (mm + 1) * h)
            if np.abs(k[r, i, hs]).sum() > 0:
              S[r:r + 1, hs] = recurrence.step(S[r:r + 1, hs], q[r:r + 1, i, hs], k[r:r + 1, i, hs], v[r:r + 1, i, hs],
                                               a[r:r + 1, i, hs], beta[r:r + 1, i, hs])[0]
    return S

  _, pre = m(jnp.asarray(x), ctx(pos, seg), state)
  routed = np.asarray(m.route(jnp.asarray(x).reshape(-1, D), b, t)[2])
  assert not routed[..., 3].any() and routed[..., :3].any((0, 1)).all()
  np.testing.assert_array_equal(heads(pre["S"], m)[:, 3], S0[:, 3])
  assert (heads(pre["S"], m)[:, :3] != S0[:, :3]).any(axis=(2, 3, 4)).all()
  assert_close(heads(pre["S"], m), heads(gathered(state["S"], seen), m), terms=4 * t)
  seen.clear()
  s = state
  for i in range(t):
    before = heads(s["S"], m)
    _, s = m(jnp.asarray(x[:, i:i + 1]), ctx(pos[:, i:i + 1], seg[:, i:i + 1]), s)
    after, on = heads(s["S"], m), routed[:, i]
    for r in range(b):
      for mm in range(4):
        if not on[r, mm]:
          np.testing.assert_array_equal(after[r, mm], before[r, mm])
  np.testing.assert_array_equal(np.asarray(s["S"]), gathered(state["S"], seen))


def model(name: str, remat: str = "none") -> Decoder:
  cfg = cli.build_config([f"config:{name}", f"set:model.remat={remat!r}"])
  return Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0))


def test_balance_loss_leaves_scanned_unrolled_and_rematerialized_stages_alike():
  """The same parameters scanned, unrolled, each with and without remat: one ``mom_balance`` (the sum over the
  4 layers), the loss = the LM loss + it, and logits with a collector open those without, bit for bit."""
  r = np.random.default_rng(0)
  ids = r.integers(0, 256, (2, 64)).astype(np.int32)
  batch = {"inputs": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, 1)),
           "positions": jnp.asarray(np.tile(np.arange(64, dtype=np.int32), (2, 1))),
           "segment_ids": jnp.ones((2, 64), jnp.int32), "loss_mask": jnp.ones((2, 64), jnp.float32)}
  c = TokenContext(batch["inputs"], batch["positions"], batch["segment_ids"])
  out = {}
  for remat in ("none", "full"):
    scanned = model("mom_tiny", remat)
    for layout_, mod in (("scanned", scanned), ("unrolled", unstack(scanned)[0])):
      graphdef, params, rest = nnx.split(mod, nnx.Param, ...)
      loss, aux = jax.jit(lambda p, r: forward_loss(graphdef, p, r, batch, 1e-4))(params, rest)
      out[layout_, remat] = float(aux["aux"]["mom_balance"])
      assert_close(loss, aux["ce"] + 1e-4 * aux["z"] + aux["aux"]["mom_balance"], terms=4)

      def logits(state, collect):
        m = nnx.merge(nnx.graphdef(mod), state)
        if not collect:
          return m(batch["inputs"], c)
        with auxiliary.collect():
          return m(batch["inputs"], c)
      state = nnx.state(mod)
      np.testing.assert_array_equal(jax.jit(logits, static_argnums=1)(state, True), jax.jit(logits, static_argnums=1)(state, False))
  first = out["scanned", "none"]
  assert 4 * 0.01 * 1.9 < first < 4 * 0.01 * 2.5  # 4 layers of about k = 2 (near-uniform routing at init)
  for v in out.values():
    assert_close(v, first, terms=8)


def test_a_mom_train_step_logs_the_balance_loss_and_adds_it(tmp_path):
  cfg = cli.build_config(["config:mom_tiny", "set:train.steps=2", "set:train.progress=False", "set:eval.valid_batches=0",
                          "fiddler:z_loss(weight=1e-4)"])
  Trainer(fdl.build(cfg), str(tmp_path)).run()
  rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
  assert len(rows) == 2
  for r in rows:
    assert r["mom_balance"] > 0
    assert_close(r["loss"], r["ce"] + 1e-4 * r["z"] + r["mom_balance"], terms=4)
  dense = cli.build_config(["config:tiny", "set:train.steps=1", "set:train.progress=False", "set:eval.valid_batches=0"])
  Trainer(fdl.build(dense), str(tmp_path / "tiny")).run()
  row = json.loads((tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()[0])
  assert "mom_balance" not in row and row["loss"] == row["ce"]  # no auxiliary loss: the LM loss alone
