"""M1 (STEM, MoVE, LaVE): forwards equal float64 NumPy transcriptions of the papers' equations,
table gradients reach exactly the looked-up rows, STEM row edits act only where the token occurs,
costs count every parameter, layer schedules, and each tiny config trains."""

import functools

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.variables import MemoryTable
from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.core.mixer import TokenContext
from pmem.memory.move import MOVE_FEATURE, LaveAttention, MoveAttention, MoveBank, lave_layers
from pmem.memory.stem import STEM, stem_layers
from pmem.models import Decoder, DecoderConfig, LayerOverride
from pmem.models.decoder import override_layers
from pmem.train.loop import Trainer, count_params
from tests.tolerances import assert_close

B, T, D, F, V = 2, 7, 32, 48, 16
N_HEADS, N_KV, HD = 4, 2, 8
# f32 module vs float64 NumPy: the one-order bound n·u·Σ|x| (tests/tolerances.py) for reductions of
# n ≲ 100 terms of O(1) (STEM: D + F = 80): 100·u·2 ≈ 1e-5 abs + rel. Attention, whose outputs
# reach ~8, takes assert_close with ATTN_TERMS: the projections (D), scores (HD), softmax's sum and
# the weighted sum over T keys, the output projection (N_HEADS·HD), and the rope / exp / divide
RTOL, ATOL = 1e-5, 1e-5
ATTN_TERMS = D + HD + 2 * T + N_HEADS * HD + 8


# ------------------------------------------------------------------------------ helpers


def context(ids, features=None):
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return TokenContext(jnp.asarray(ids, jnp.int32), pos, jnp.ones((b, t), jnp.int32), features or {})


@functools.partial(jax.jit, static_argnums=0)
def _apply(g, st, x, ctx):
  return nnx.merge(g, st)(x, ctx)


def apply(module, x, ctx):
  """Jitted module call on its split state (eager NNX dispatch is slow on CPU); one compile per
  module structure."""
  return _apply(*nnx.split(module), x, ctx)


def table_grad(module, x, ctx):
  """d/d(tables) of <module(x, ctx), W> for a fixed random cotangent W: {path: grad}."""
  g, tables, rest = nnx.split(module, MemoryTable, ...)
  w = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
  f = lambda tables: (nnx.merge(g, tables, rest)(x, ctx) * w).sum()
  grads = jax.jit(jax.grad(f))(tables)
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def touched_rows(grad):
  return set(np.nonzero(np.abs(grad).reshape(grad.shape[0], -1).sum(-1))[0].tolist())


def randomized(factory, seed):
  """The module ``factory()`` builds, with every variable drawn from NumPy (no random-op compiles):
  tables N(0, 1), vectors 1 + 0.1 N(0, 1), weights N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)

  def draw(v):
    axes = v.get_metadata().get("axes", (None,) * v.ndim)
    core = v.shape[v.ndim - len(axes):]  # without stacked-layer dims
    if isinstance(v, MemoryTable):
      a = rng.normal(size=v.shape)
    elif len(core) == 1:
      a = 1.0 + 0.1 * rng.normal(size=v.shape)
    else:  # weights into "embed" (wo, w_down) contract every other dim, the rest their first
      fan_in = np.prod(core[:-1]) if axes[-1] == "embed" else core[0]
      a = rng.normal(size=v.shape) / np.sqrt(fan_in)
    return v.replace(jnp.asarray(a, jnp.float32))

  g, st = nnx.split(nnx.eval_shape(factory))
  return nnx.merge(g, jax.tree.map(draw, st, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def initialized(factory):
  """The module ``factory()`` builds, initialised in one jitted program."""
  g, _ = nnx.split(nnx.eval_shape(factory))
  return nnx.merge(g, jax.jit(lambda: nnx.split(factory())[1])())


def f64(var):
  return np.asarray(var[...], np.float64)


def sample_ids(rng, vocab=V, used=6):
  """Ids drawn from a few rows only, so that most rows are never read."""
  return rng.choice(rng.permutation(vocab)[:used], size=(B, T))


def params_of(module) -> int:
  return count_params(nnx.state(module, nnx.Param))


# ------------------------------------------------------------------------------ NumPy references


def silu(a):
  return a / (1.0 + np.exp(-a))


def sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def stem_np(x, ids, p, variant):
  """modules.md §1(a): y = W_d(SiLU(W_g x) ⊙ U[t]); replace-gate SiLU(U[t]) ⊙ W_u x; STEM†
  SiLU(W_g x) ⊙ (W_u x + U[t])."""
  u = p["U"][ids]
  if variant == "stem":
    h = silu(x @ p["Wg"]) * u
  elif variant == "replace_gate":
    h = silu(u) * (x @ p["Wu"])
  else:
    h = silu(x @ p["Wg"]) * (x @ p["Wu"] + u)
  return h @ p["Wd"]


def rope_np(x, theta=10000.0):
  """HF rotate-half RoPE at positions 0..T-1 (pmem's convention)."""
  t, h = x.shape[1], x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = np.arange(t)[:, None] * inv
  ang = np.concatenate([ang, ang], -1)[None, :, None, :]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def attention_np(x, p, mix):
  """Causal GQA attention whose values are ``mix(v)`` [B, T, K, h]."""
  q = rope_np(np.einsum("btd,dnh->btnh", x, p["wq"]))
  k = rope_np(np.einsum("btd,dkh->btkh", x, p["wk"]))
  v = mix(np.einsum("btd,dkh->btkh", x, p["wv"]))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((x.shape[1], x.shape[1]), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bnqk,bknh->bqnh", a, v)
  return np.einsum("bqnh,nhd->bqd", o, p["wo"])


def move_mix_np(v, x, ids, w_router, bank):
  """modules.md §3(a): g = 2σ(W_G h) ∈ (0,2)^{K×(M+1)}; V̂ = g_0 V + Σ_i g_i E[x_t, i]; bank [V, M, K, h]."""
  k, m = v.shape[2], bank.shape[1]
  g = 2.0 * sigmoid(np.einsum("btd,dkm->btkm", x, w_router.reshape(x.shape[-1], k, m + 1)))
  e = bank[ids]  # [B, T, M, K, h]
  return g[..., 0:1] * v + np.einsum("btki,btikh->btkh", g[..., 1:], e)


def lave_mix_np(v, x, ids, w_gate, table, c):
  """modules.md §3 (nanochat): v + c·σ(W x[..., :C]) ⊙ ve, one gate per value head."""
  g = c * sigmoid(x[..., : w_gate.shape[0]] @ w_gate)  # [B, T, K]
  return v + g[..., None] * table[ids].reshape(v.shape)


def attention_params(m):
  return {name: f64(getattr(m, name)) for name in ("wq", "wk", "wv", "wo")}


# ------------------------------------------------------------------------------ STEM


@pytest.mark.parametrize("variant", ["stem", "replace_gate", "additive"])
def test_stem_matches_numpy_and_costs(variant):
  rng = np.random.default_rng(0)
  m = randomized(lambda: STEM(D, d_ff=F, vocab=V, variant=variant, rngs=nnx.Rngs(0)), 0)
  assert hasattr(m, "w_gate") == (variant != "replace_gate") and hasattr(m, "w_up") == (variant != "stem")
  p = {"U": f64(m.table), "Wd": f64(m.w_down)}
  p |= {name: f64(getattr(m, attr)) for name, attr in (("Wg", "w_gate"), ("Wu", "w_up")) if hasattr(m, attr)}
  x = rng.normal(size=(B, T, D))
  ids = rng.integers(0, V, (B, T))
  y = apply(m, jnp.asarray(x, jnp.float32), context(ids))
  np.testing.assert_allclose(np.asarray(y), stem_np(x, ids, p, variant), rtol=RTOL, atol=ATOL)
  c = m.cost(T)
  assert c.params == params_of(m)
  assert c.active_params == c.params - (V - 1) * F  # one table row per token
  assert c.flops == (6 if variant == "additive" else 4) * D * F  # lookups are free


def test_stem_init_follows_the_reference():
  v, f, d = 512, 256, 128
  m = initialized(lambda: STEM(d, d_ff=f, vocab=v, out_scale=0.5, rngs=nnx.Rngs(1)))
  std = lambda a: float(np.asarray(a[...]).std())
  # rel 0.02: the std of n ≥ 256·128 draws has relative standard error 1/√(2n) ≤ 0.4% (the draws are
  # jax.random's, fixed by the seed on any CPU)
  assert std(m.table) == pytest.approx((2 / (v + f)) ** 0.5, rel=0.02)  # xavier-normal over V x d_ff
  trunc3 = 0.98658  # std of a unit normal truncated at ±3
  assert std(m.w_gate) == pytest.approx(trunc3 * d ** -0.5, rel=0.02)
  assert std(m.w_down) == pytest.approx(trunc3 * 0.5 * f ** -0.5, rel=0.02)
  assert np.abs(np.asarray(m.w_gate[...])).max() <= 3 * d ** -0.5


def test_stem_table_gradient_reaches_exactly_the_looked_up_rows():
  rng = np.random.default_rng(1)
  m = randomized(lambda: STEM(D, d_ff=F, vocab=V, rngs=nnx.Rngs(1)), 1)
  ids = sample_ids(rng)
  (grad,) = table_grad(m, jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32), context(ids)).values()
  assert grad.shape == (V, F)
  assert touched_rows(grad) == set(ids.ravel().tolist())


def test_stem_row_edit_acts_only_where_the_token_occurs():
  rng = np.random.default_rng(2)
  ids = np.array([[3, 5, 7, 3, 9, 5, 11], [1, 2, 4, 6, 5, 8, 10]])
  t_a, t_b = 5, 12
  # the module alone: outputs change exactly at the positions of t_a
  m = randomized(lambda: STEM(D, d_ff=F, vocab=V, rngs=nnx.Rngs(2)), 2)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y0 = np.asarray(apply(m, x, context(ids)))
  m.table[...] = m.table[...].at[t_a].set(m.table[...][t_b])
  y1 = np.asarray(apply(m, x, context(ids)))
  changed = np.abs(y1 - y0).max(-1) > 0  # bitwise elsewhere: one program, inputs that differ in row t_a only
  np.testing.assert_array_equal(changed, ids == t_a)
  # a 2-layer decoder with attention: logits before t_a's first occurrence are untouched
  cfg = DecoderConfig(vocab=V, d_model=D, n_layers=2,
                      sequence_mixer=functools.partial(Attention, n_heads=N_HEADS, n_kv_heads=N_KV),
                      channel_mixer=functools.partial(SwiGLU, d_ff=F),
                      overrides=(LayerOverride(layers=(0, 1), channel_mixer=functools.partial(STEM, d_ff=F, vocab=V)),))
  dec = randomized(lambda: Decoder(cfg, rngs=nnx.Rngs(3)), 3)
  ffn = dec.stages[0].blocks.ch  # one scanned stage: tables [2, V, F]
  assert ffn.table.shape == (2, V, F)
  g, st = nnx.split(dec)
  fwd = jax.jit(lambda st, ids: nnx.merge(g, st)(ids, context(ids)))
  ids_j = jnp.asarray(ids, jnp.int32)
  l0 = np.asarray(fwd(st, ids_j))
  ffn.table[...] = ffn.table[...].at[:, t_a].set(ffn.table[...][:, t_b])  # in every STEM layer
  l1 = np.asarray(fwd(nnx.split(dec)[1], ids_j))
  for row in range(B):
    first = int(np.argmax(ids[row] == t_a))
    np.testing.assert_array_equal(l1[row, :first], l0[row, :first])  # bitwise: causal, the same program
    assert np.abs(l1[row, first] - l0[row, first]).max() > 1e-4


def test_stem_layer_schedules():
  assert stem_layers(4) == (1, 2, 3)  # the reference default: all but layer 0
  assert stem_layers(8, "half") == (1, 3, 5, 7)  # the reference README example
  assert stem_layers(12, "third") == (2, 5, 8, 11)
  assert stem_layers(3, "all") == (0, 1, 2)
  assert stem_layers(6, (4, 1)) == (1, 4)
  for bad in ("thirds", (0, 6)):
    with pytest.raises(ValueError):
      stem_layers(6, bad)
  with pytest.raises(ValueError, match="no layer"):
    stem_layers(2, "third")
  assert lave_layers(4) == (1, 3) and lave_layers(5) == (0, 2, 4)  # nanochat: last layer included


def test_stem_fiddlers():
  cfg = cli.build_config(["config:stem_tiny", "fiddler:stem_variant(variant='additive')",
                          "fiddler:stem_layers(schedule='half')"])
  (over,) = cfg.model.overrides
  assert override_layers(fdl.build(over), 4) == (1, 3) and over.channel_mixer.variant == "additive"
  assert override_layers(fdl.build(over), 8) == (1, 3, 5, 7)  # the schedule follows model.n_layers
  t, o = cfg.train.optim.tables, cfg.train.optim
  assert (t.lr_mult, t.weight_decay, t.clip_norm, t.b1, t.b2) == (1.0, o.weight_decay, o.clip_norm, o.b1, o.b2)


# ------------------------------------------------------------------------------ MoVE / LaVE


def test_move_matches_numpy_costs_and_gradients():
  rng = np.random.default_rng(3)
  m_slots = 3
  m = randomized(lambda: MoveAttention(D, N_HEADS, N_KV, V, m_slots, rngs=nnx.Rngs(3)), 3)
  p, bank = attention_params(m), f64(m.bank).reshape(V, m_slots, N_KV, HD)
  x = rng.normal(size=(B, T, D))
  ids = sample_ids(rng)
  y = apply(m, jnp.asarray(x, jnp.float32), context(ids))
  ref = attention_np(x, p, lambda v: move_mix_np(v, x, ids, f64(m.w_router), bank))
  assert_close(y, ref, terms=ATTN_TERMS + D + m_slots + 1, k=0.5)  # + the router (D) and the mix (M + 1)
  (grad,) = table_grad(m, jnp.asarray(x, jnp.float32), context(ids)).values()
  assert touched_rows(grad) == set(ids.ravel().tolist())
  c = m.cost(T)
  base = nnx.eval_shape(lambda: Attention(D, N_HEADS, N_KV, rngs=nnx.Rngs(0))).cost(T)
  assert c.params == params_of(m)
  assert c.active_params - base.active_params == D * N_KV * (m_slots + 1) + m_slots * N_KV * HD
  assert c.flops - base.flops == 2 * D * N_KV * (m_slots + 1)


def test_move_shared_bank_serves_every_layer():
  """bank='shared': one MoveBank lookup in ctx.features feeds two layers; its gradient collects
  both layers' contributions on exactly the looked-up rows."""
  rng = np.random.default_rng(4)
  m_slots = 2
  layers = [randomized(lambda: MoveAttention(D, N_HEADS, N_KV, V, m_slots, bank="shared", rngs=nnx.Rngs(0)), s)
            for s in (4, 5)]
  assert not any(hasattr(m, "bank") for m in layers)
  mb = randomized(lambda: MoveBank(D, V, m_slots, N_HEADS, N_KV, HD, rngs=nnx.Rngs(6)), 6)
  bank = f64(mb.table).reshape(V, m_slots, N_KV, HD)
  x = rng.normal(size=(B, T, D))
  ids = sample_ids(rng)
  ids_j = jnp.asarray(ids, jnp.int32)

  def two_layers(mb, l0, l1, x):
    ctx = context(ids, {MOVE_FEATURE: mb(ids_j, context(ids))})  # looked up once per token
    return l1(l0(x, ctx), ctx)

  mods = (mb, *layers)
  g, tables, rest = nnx.split(mods, MemoryTable, ...)
  f = lambda t: two_layers(*nnx.merge(g, t, rest), jnp.asarray(x, jnp.float32))
  y, vjp = jax.jit(lambda t: jax.vjp(f, t))(tables)
  ref = x
  for m in layers:
    ref = attention_np(ref, attention_params(m), lambda v, h=ref, m=m: move_mix_np(v, h, ids, f64(m.w_router), bank))
  assert_close(y, ref, terms=2 * (ATTN_TERMS + D + m_slots + 1), k=0.5)  # two layers
  (grad,) = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(vjp(jnp.ones_like(y))[0])]
  assert touched_rows(grad) == set(ids.ravel().tolist())
  assert mb.cost(T).params == params_of(mb) == V * m_slots * N_KV * HD
  assert layers[0].cost(T).params == params_of(layers[0])  # the layers hold no bank
  with pytest.raises(KeyError, match="ctx.features"):
    layers[0].bank_rows(context(ids))


def test_lave_matches_numpy_costs_and_gradients():
  rng = np.random.default_rng(5)
  c_gate, scale = 12, 3.0
  m = randomized(lambda: LaveAttention(D, N_HEADS, N_KV, V, gate_channels=c_gate, gate_scale=scale,
                                       rngs=nnx.Rngs(7)), 7)
  x = rng.normal(size=(B, T, D))
  ids = sample_ids(rng)
  y = apply(m, jnp.asarray(x, jnp.float32), context(ids))
  ref = attention_np(x, attention_params(m), lambda v: lave_mix_np(v, x, ids, f64(m.w_gate), f64(m.table), scale))
  assert_close(y, ref, terms=ATTN_TERMS + c_gate + 2, k=0.5)  # + the gate over C channels, sigmoid
  (grad,) = table_grad(m, jnp.asarray(x, jnp.float32), context(ids)).values()
  assert touched_rows(grad) == set(ids.ravel().tolist())
  assert m.cost(T).params == params_of(m)


# ------------------------------------------------------------------------------ configs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stem_tiny", "move_tiny", "lave_tiny"])
def test_tiny_config_trains(name):
  cfg = cli.build_config([f"config:{name}", "set:train.steps=3", "set:train.progress=False",
                          "set:eval.valid_batches=0", "set:train.batch_size=4", "set:train.seq_len=32"])
  t = Trainer(fdl.build(cfg))
  flat = nnx.to_flat_state(t.train_state["params"])
  assert any(isinstance(v, MemoryTable) for _, v in flat)  # routed to the table optimizer by type
  gates = [v for path, v in flat if "seq" in path and path[-1] in ("w_router", "w_gate")]
  # MoVE: one stacked stage; LaVE on alternate layers: one stage scanning 2 periods of (plain, LaVE)
  assert len(gates) == {"stem_tiny": 0, "move_tiny": 1, "lave_tiny": 1}[name]
  assert not any(np.any(np.asarray(v.get_value())) for v in gates)  # zero-init: every gate starts at 1
  summary = t.run()
  assert np.isfinite(summary["final_loss"])
  assert t.summary_header()["params_total"] == t.cost.params  # the protocol's count is exact


def test_move_tiny_shares_one_bank_across_layers():
  exp = fdl.build(cli.build_config(["config:move_tiny"]))
  model = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0)))
  tables = nnx.to_flat_state(nnx.state(model, MemoryTable))
  assert [p for p, _ in tables] == [("shared", "move", "table")]  # one global bank, no per-layer copies
  counted = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert model.cost(exp.train.seq_len).params == counted
  ids = jnp.zeros((2, 8), jnp.int32)
  ctx = TokenContext(ids, jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones_like(ids))
  assert jax.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0))(ids, ctx)).shape == (2, 8, 256)
