"""M2 (PKM, Memory+): forwards equal lucidrains' PKM (torch oracle) and a float64 NumPy brute force
over all N slots, top-k retrieval is exact, gradients reach exactly the selected value rows and
sub-keys, costs count every parameter, row-sparse SGD of the values equals dense SGD (own and
shared tables), and the tiny configs train."""

import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.variables import MemoryTable
from pmem.memory import diagnostics
from kernels import candidate_pairs
from pmem.memory.pkm import PKM, VALUES_FEATURE, MemoryPlus, PKMValues
from pmem.models import Decoder
from pmem.models.decoder import override_layers
from pmem.train import optim, sparse
from pmem.train.loop import Trainer
from tests.conftest import ROOT, read_losses, run_oracle
from tests.test_stem_move import (B, D, T, apply, context, f64, initialized, params_of, randomized, sigmoid, silu,
                                  touched_rows)
from tests.test_tables import loss, split, table_params
from tests.tolerances import assert_close, tol

H, N_KEYS, K, DK = 2, 16, 4, 16  # 256 slots
# f32 module vs float64 NumPy: the one-order bound n·u·Σ|x| (tests/tolerances.py) for reductions of
# n ≲ 100 terms of O(1) (queries over D = 32, norms and scores over d_k/2, bags of k rows, the
# projections): 100·u·2 ≈ 1e-5 abs + rel. The scores themselves reach ~16: assert_close there.
RTOL, ATOL = 1e-5, 1e-5
SCORE_TERMS = D + 2 * DK + 8  # the query projection, the norms (means over d_k/2), the half-scores, their sum


def memory(cls=PKM, seed=0, **kw):
  """A randomized module (test_stem_move.randomized) with a gate weight small enough not to saturate."""
  m = randomized(lambda: cls(D, n_keys=N_KEYS, heads=H, k=K, d_k=DK, rngs=nnx.Rngs(0), **kw), seed)
  if m.gated:
    m.w_g[...] = jnp.asarray(np.random.default_rng(seed).normal(size=D) / np.sqrt(D), jnp.float32)
  return m


def inputs(seed=0):
  rng = np.random.default_rng(100 + seed)
  ids = rng.integers(0, 256, (B, T))
  return rng.normal(size=(B, T, D)), context(ids)


# ------------------------------------------------------------------------------ NumPy reference


def queries_np(x, p, query_norm, eps=1e-5):
  """Normalized half-queries [BT, H, 2, d_k/2] (modules.md §4(a); LayerNorm/RMSNorm per half)."""
  q = (x.reshape(-1, x.shape[-1]) @ p["w_q"]).reshape(-1, H, 2, DK // 2)
  if query_norm == "none":
    return q
  if query_norm == "layernorm":
    q = q - q.mean(-1, keepdims=True)
  q = q / np.sqrt((q * q).mean(-1, keepdims=True) + eps) * p["q_scale"]
  return q + p["q_bias"] if query_norm == "layernorm" else q


def all_slot_scores_np(x, p, query_norm, qk_norm, eps=1e-5):
  """Scores of every slot i·n + j: q¹·K¹_i + q²·K²_j, [BT, H, N] (no product-key shortcut)."""
  keys = p["keys"]
  if qk_norm:
    keys = keys / np.sqrt((keys * keys).mean(-1, keepdims=True) + eps) * p["k_scale"]
  s = np.einsum("thpc,hpnc->thpn", queries_np(x, p, query_norm, eps), keys)
  return (s[:, :, 0, :, None] + s[:, :, 1, None, :]).reshape(s.shape[0], H, -1)


def brute_topk_np(full):
  """Top-K slots of every head by a full sort (descending) and their scores. Checks the data has no
  near-ties: the K + 1 best scores lie further apart than twice the float32 scores' tolerance (as in
  test_topk_is_the_brute_force_topk_over_all_slots), so that the module selects these slots, in this
  order, on any CPU."""
  slots = np.argsort(-full, axis=-1, kind="stable")[..., :K]
  top = -np.sort(-full, axis=-1)[..., :K + 1]
  t = tol(np.float32, np.abs(top).max(), SCORE_TERMS, k=0.5)
  assert -np.diff(top, axis=-1).min() > 2 * (t["atol"] + t["rtol"] * np.abs(top).max())
  return np.take_along_axis(full, slots, -1), slots


def softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def pkm_np(x, p, values, *, query_norm="layernorm", qk_norm=False, swilu=False, gated=False):
  """PKM / Memory+ (modules.md §4(a)) in float64: y = o, W_out o, or W_out(o ⊙ SiLU(W_in x)); gate σ(w_g·x)."""
  b, t, d = x.shape
  x2 = x.reshape(-1, d)
  scores, slots = brute_topk_np(all_slot_scores_np(x, p, query_norm, qk_norm))
  o = np.einsum("thk,thkv->tv", softmax(scores), values[slots])
  if swilu:
    o = o * silu(x2 @ p["w_in"])
  if "w_out" in p:
    o = o @ p["w_out"]
  if gated:
    o = sigmoid(x2 @ p["w_g"])[:, None] * o
  return o.reshape(b, t, d)


def weights_np(m):
  names = ("w_q", "keys", "q_scale", "q_bias", "k_scale", "w_in", "w_out", "w_g")
  return {n: f64(getattr(m, n)) for n in names if hasattr(m, n)}


# ------------------------------------------------------------------------------ forward parity


VARIANTS = {  # (class, kwargs)
    "pkm": (PKM, {}),
    "pkm_projected_gated_no_norm": (PKM, dict(d_v=24, query_norm="none", gated=True)),
    "memory_plus_rmsnorm_qk_norm_gated": (MemoryPlus, dict(query_norm="rmsnorm", qk_norm=True, gated=True, d_v=40)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_numpy_brute_force(variant):
  cls, kw = VARIANTS[variant]
  m = memory(cls, seed=1, **kw)
  x, ctx = inputs(1)
  y = apply(m, jnp.asarray(x, jnp.float32), ctx)
  ref = pkm_np(x, weights_np(m), f64(m.values), query_norm=m.query_norm, qk_norm=m.qk_norm, swilu=cls is MemoryPlus,
               gated=m.gated)
  assert hasattr(m, "w_out") == (cls is MemoryPlus or "d_v" in kw)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=RTOL, atol=ATOL)
  assert np.abs(ref).max() > 0.1  # not degenerate


def test_shared_values_match_numpy_and_collect_both_layers_gradients():
  """values='pkm_values': one PKMValues table feeds two Memory+ layers (own queries, keys,
  projections); its gradient is non-zero on exactly the union of the rows both layers selected."""
  layers = [memory(MemoryPlus, seed=s, values=VALUES_FEATURE, layer=s) for s in (2, 3)]
  assert not any(hasattr(m, "values") for m in layers)
  bank = randomized(lambda: PKMValues(D, N_KEYS, rngs=nnx.Rngs(0)), 4)
  x, ctx = inputs(2)
  ids = ctx.ids

  def two_layers(bank, l0, l1, x):
    c = context(ids, {VALUES_FEATURE: bank(ids)})
    return l1(l0(x, c), c)

  g, tables, rest = nnx.split((bank, *layers), MemoryTable, ...)
  f = lambda t: two_layers(*nnx.merge(g, t, rest), jnp.asarray(x, jnp.float32))
  y, vjp = jax.jit(lambda t: jax.vjp(f, t))(tables)
  values, h, selected = f64(bank.values), x, set()
  for m in layers:
    p = weights_np(m)
    selected |= set(brute_topk_np(all_slot_scores_np(h, p, m.query_norm, False))[1].ravel().tolist())
    h = pkm_np(h, p, values, swilu=True)
  np.testing.assert_allclose(np.asarray(y), h, rtol=RTOL, atol=ATOL)
  (grad,) = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(vjp(jnp.ones_like(y))[0])]
  assert touched_rows(grad) == selected
  assert bank.cost(T).params == params_of(bank) == N_KEYS ** 2 * D
  assert layers[0].cost(T).params == params_of(layers[0])  # the layers hold no table
  with pytest.raises(KeyError, match="ctx.features"):
    layers[0](jnp.asarray(x, jnp.float32), ctx)


@pytest.mark.oracle
def test_matches_lucidrains_pkm(tmp_path):
  """lucidrains PKM (LayerNorm queries, softmax gate, EmbeddingBag sum) on the same weights: its
  queries are laid out (half, head, dim), its keys (head, key, half, dim)."""
  d, heads, n, k, dh = 32, 2, 16, 4, 8
  m = randomized(lambda: PKM(d, n_keys=n, heads=heads, k=k, d_k=2 * dh, rngs=nnx.Rngs(0)), 5)
  x = np.random.default_rng(5).normal(size=(2, 9, d)).astype(np.float32)
  ours = np.asarray(apply(m, jnp.asarray(x), context(np.zeros((2, 9), np.int64))))
  w_q = np.asarray(m.w_q[...]).reshape(d, heads, 2, dh).transpose(2, 1, 3, 0).reshape(2 * heads * dh, d)
  cfg = {"dim": d, "heads": heads, "num_keys": n, "topk": k, "dim_head": dh}
  np.savez(tmp_path / "in.npz", config=json.dumps(cfg), x=x, to_queries=w_q, norm_weight=np.asarray(m.q_scale[...]),
           norm_bias=np.asarray(m.q_bias[...]), keys=np.asarray(m.keys[...]).transpose(0, 2, 1, 3),
           values=np.asarray(m.values[...]))
  run_oracle(str(ROOT / "experiments/oracles/pkm.py"), "forward", str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
  theirs = np.load(tmp_path / "out.npz")["y"]
  print(f"max |pmem - lucidrains| = {np.abs(ours - theirs).max():.3e}")
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # two float32 orders: ≲ 100·eps·O(1)
  assert np.abs(theirs).max() > 0.1


# ------------------------------------------------------------------------------ retrieval and gradients


@pytest.mark.parametrize("implementation", ["xla", "auto"])  # auto: native on CPU (test_kernels covers the op)
def test_topk_is_the_brute_force_topk_over_all_slots(implementation):
  for k in (16, 8, 1):
    assert len(candidate_pairs(k)[0]) == sum(k // i for i in range(1, k + 1))  # (i+1)(j+1) <= k
  # through the module: query projection, norm and both sub-key sets
  m = memory(MemoryPlus, seed=7, qk_norm=True, implementation=implementation)
  x, _ = inputs(7)
  sc, sl = jax.jit(lambda g, st, x: nnx.merge(g, st).retrieve(x))(*nnx.split(m), jnp.asarray(x, jnp.float32))
  ref_sc, ref_sl = brute_topk_np(all_slot_scores_np(x, weights_np(m), "layernorm", True))
  np.testing.assert_array_equal(np.asarray(sl).reshape(ref_sl.shape), ref_sl)
  assert_close(np.asarray(sc).reshape(ref_sc.shape), ref_sc, terms=SCORE_TERMS, k=0.5)


def test_gradients_reach_exactly_the_selected_rows_and_sub_keys():
  m = memory(PKM, seed=8)
  x, ctx = inputs(8)
  scores, slots = brute_topk_np(all_slot_scores_np(x, weights_np(m), "layernorm", False))  # [BT, H, K]
  cot = np.random.default_rng(9).normal(size=x.shape)
  g, st = nnx.split(m)
  f = lambda st: (nnx.merge(g, st)(jnp.asarray(x, jnp.float32), ctx) * jnp.asarray(cot, jnp.float32)).sum()
  grads = {p[-1]: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(jax.jit(jax.grad(f))(st))}
  # values (y = o): dV[s] = Σ_{t,h,r: slot = s} w_{t,h,r} cot_t, and no other row
  want = np.zeros((N_KEYS ** 2, D))
  np.add.at(want, slots.reshape(-1), (softmax(scores)[..., None] * cot.reshape(-1, 1, 1, D)).reshape(-1, D))
  assert touched_rows(grads["values"]) == set(slots.ravel().tolist())
  # softmax turns the scores' absolute error (≈ u·(D + 2·d_k)·|s|, |s| ≲ 16: up to ~1e-5) into a
  # relative one of the weights: rtol 1e-4; atol 1e-5 as RTOL / ATOL, for sums that cancel
  np.testing.assert_allclose(grads["values"], want, rtol=1e-4, atol=1e-5)
  # keys: sub-key i of half 1 (j of half 2) of head h moves iff a selected slot i·n + j uses it
  for h in range(H):
    for half, used in ((0, slots[:, h] // N_KEYS), (1, slots[:, h] % N_KEYS)):
      moved = np.nonzero(np.abs(grads["keys"][h, half]).sum(-1))[0]
      assert set(moved.tolist()) == set(used.ravel().tolist()), (h, half)
  assert np.all(np.abs(grads["w_q"]).sum(0) > 0)  # every query column gets a gradient
  assert np.abs(grads["q_scale"]).min() > 0


def test_usage_diagnostic_reports_the_selected_slots():
  m = memory(PKM, seed=10)
  x, ctx = inputs(10)
  with diagnostics.collect() as c:
    m(jnp.asarray(x, jnp.float32), ctx)
  ((slots, num),) = c.usage["pkm"]
  assert num == N_KEYS ** 2
  want = brute_topk_np(all_slot_scores_np(x, weights_np(m), "layernorm", False))[1]
  np.testing.assert_array_equal(np.asarray(slots).reshape(want.shape), want)


# ------------------------------------------------------------------------------ cost, init, errors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cost_counts_every_parameter_and_the_reads(variant):
  cls, kw = VARIANTS[variant]
  m = nnx.eval_shape(lambda: cls(D, n_keys=N_KEYS, heads=H, k=K, d_k=DK, rngs=nnx.Rngs(0), **kw))
  c, dv = m.cost(T), kw.get("d_v", D)
  assert c.params == params_of(m)
  # every parameter is read by every token except the value rows: H·k of N
  assert c.active_params == c.params - (N_KEYS ** 2 - H * K) * dv
  assert c.bytes_read == 4 * c.active_params
  proj = (2 * D * dv if cls is MemoryPlus else D * dv if dv != D else 0) + (D if m.gated else 0)
  pairs = sum(K // i for i in range(1, K + 1))  # candidate sums per head: (i+1)(j+1) <= K
  assert c.flops == 2 * D * H * DK + 2 * H * N_KEYS * DK + H * pairs + 2 * proj


def test_init_follows_the_reference():
  d, n, dk, dv = 128, 64, 64, 96
  m = initialized(lambda: MemoryPlus(d, n_keys=n, heads=4, k=8, d_k=dk, d_v=dv, gated=True, rngs=nnx.Rngs(1)))
  a = lambda v: np.asarray(v[...])
  # rel 0.02: the std of n ≥ 16384 draws has relative standard error ≤ 1/√(2n) ≈ 0.6% (0.4% for the
  # uniform keys), of 128 draws 1/√256 ≈ 6% (rel 0.2); jax.random fixes them by the seed on any CPU
  assert np.abs(a(m.keys)).max() <= dk ** -0.5 and a(m.keys).std() == pytest.approx(dk ** -0.5 / 3 ** 0.5, rel=0.02)
  assert a(m.values).std() == pytest.approx(dv ** -0.5, rel=0.02)
  bound = (6 / (d + 4 * dk)) ** 0.5  # xavier-uniform
  assert np.abs(a(m.w_q)).max() <= bound and a(m.w_q).std() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
  for w in (m.w_in, m.w_out):
    assert a(w).std() == pytest.approx(d ** -0.5, rel=0.02)
  assert a(m.w_g).std() == pytest.approx(d ** -0.5, rel=0.2)  # 128 draws
  np.testing.assert_array_equal(a(m.q_scale), 1.0)
  np.testing.assert_array_equal(a(m.q_bias), 0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(query_norm="batchnorm"), "leaking future tokens"),
    (dict(query_norm="layer"), r"query_norm must be one of \('layernorm', 'rmsnorm', 'none'\)"),
    (dict(query_norm="none", qk_norm=True), "qk_norm"),
    (dict(k=17), "k must lie in 1..n_keys=16"),
    (dict(d_k=15), "d_k must be even"),
    (dict(heads=0), "heads must be >= 1"),
])
def test_bad_arguments_raise(kw, match):
  args = dict(n_keys=N_KEYS, heads=H, k=K, d_k=DK) | kw
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: PKM(D, rngs=nnx.Rngs(0), **args))


# ------------------------------------------------------------------------------ configs and training


def test_configs_place_the_memory_and_the_value_optimizer():
  cfg = cli.build_config(["config:pkm_tiny"])
  (over,) = cfg.model.overrides
  assert override_layers(fdl.build(over), 4) == (2,) and fdl.get_callable(over.channel_mixer) is PKM
  t, o = cfg.train.optim.tables, cfg.train.optim
  assert t.lr_mult * o.lr == pytest.approx(1e-3)  # Meta's fixed value lr, under the schedule (one float64 rounding)
  assert (t.optimizer, t.weight_decay, t.clip_norm, t.b1, t.b2) == ("adamw", o.weight_decay, o.clip_norm, o.b1, o.b2)
  cfg = cli.build_config(["config:tiny", "fiddler:memory_plus(layers=(1, 2), shared_values=True, gated=True, k=4)"])
  exp = fdl.build(cfg)
  model = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0)))
  tables = [p for p, _ in nnx.to_flat_state(nnx.state(model, MemoryTable))]
  assert tables == [("shared", VALUES_FEATURE, "values")]  # one table for both layers
  assert [s.n for s in model.stages] == [1, 1, 1, 1]  # never stacked: row-sparse reads stay in trace order
  counted = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert model.cost(exp.train.seq_len).params == counted
  with pytest.raises(ValueError, match="already has product-key memory layers"):
    cli.build_config(["config:pkm_tiny", "fiddler:pkm"])


class Stack(nnx.Module):
  """Two Memory+ layers reading one PKMValues table (as the decoder wires ``model.shared``), then a
  PKM layer with its own table."""

  def __init__(self, rngs: nnx.Rngs):
    self.bank = PKMValues(D, N_KEYS, rngs=rngs)
    kw = dict(n_keys=N_KEYS, heads=H, k=K, d_k=DK, rngs=rngs)
    self.layers = nnx.List([*(MemoryPlus(D, values=VALUES_FEATURE, layer=i, **kw) for i in range(2)), PKM(D, **kw)])

  def __call__(self, x, ctx):
    ctx = context(ctx.ids, {VALUES_FEATURE: self.bank(ctx.ids)})
    for m in self.layers:
      x = m(x, ctx)
    return x


def layer_sgd(update: str, make, steps: int = 3) -> dict[str, np.ndarray]:
  """Parameters after SGD on the value tables (``update``) and AdamW on the rest, one batch per step.
  Adam's eps = 1 keeps its steps proportional to the gradients: with the default 1e-8 a gradient
  component near zero moves its parameter by ±lr whichever its last bits, and a last-bit difference
  between the two updates would grow."""
  merge, params = split(make())
  cfg = optim.OptimConfig(lr=0.01, warmup_steps=0, weight_decay=0.0, clip_norm=None, eps=1.0,
                          tables=optim.TableOptimConfig(update=update, optimizer="sgd", lr_mult=1.0, clip_norm=None))
  tx = optim.Optimizer(cfg, steps)

  @jax.jit
  def step(params, opt, x, ctx):
    (_, _), grads = sparse.value_and_grad(lambda p: loss(merge(p)(x, ctx)), params, tx.row_sparse)
    updates, opt = tx.update(grads, opt, params)
    return tx.apply_updates(params, updates), opt

  opt = tx.init(params)
  for s in range(steps):
    x, ctx = inputs(20 + s)
    params, opt = step(params, opt, jnp.asarray(x, jnp.float32), ctx)
  return {sparse.name_of(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def test_row_sparse_sgd_of_shared_and_own_values_equals_dense_sgd():
  make = lambda: randomized(lambda: Stack(nnx.Rngs(0)), 11)
  before = {sparse.name_of(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(make(), nnx.Param))}
  rows, dense = layer_sgd("row_sparse", make), layer_sgd("dense", make)
  tables = [n for n in dense if n.endswith("values")]
  assert tables == ["bank/values", "layers/2/values"]
  for name in tables:
    moved = np.any(rows[name] != before[name], axis=-1)
    assert 0 < moved.sum() < moved.size, (name, moved.sum())  # selected rows move, the others do not
  assert rows.keys() == dense.keys()
  for n, want in dense.items():  # SGD on the values: the same gradient sums (compact rows, scatter-add);
    # AdamW with eps = 1 moves the rest in proportion to gradients that differ only in last bits
    np.testing.assert_allclose(rows[n], want, rtol=1e-5, atol=1e-5, err_msg=n)


@pytest.mark.parametrize("implementation,rows", [("xla", "xla"), ("auto", "xla"), ("auto", "native")])
def test_row_sparse_step_writes_the_value_rows_in_place(implementation, rows):
  """The donated row-sparse Adam step holds no copy of the value table: its reads (forward, weight
  gradient, the rows to update) are ordered before the in-place write (XLA's scatter, or the native
  fused row Adam on the aliased table and moments). Unordered, XLA copied the table twice per step
  (2 x 1 GiB at 2^20 slots). ``implementation``: the bags' (auto: the native kernels on CPU)."""
  merge, params = split(memory(PKM, implementation=implementation))
  tables = optim.TableOptimConfig(update="row_sparse", optimizer="adam", implementation=rows)
  tx = optim.Optimizer(optim.OptimConfig(tables=tables), 10)

  def step(params, opt, x, ctx):
    (_, _), grads = sparse.value_and_grad(lambda p: loss(merge(p)(x, ctx)), params, tx.row_sparse)
    updates, opt = tx.update(grads, opt, params)
    return tx.apply_updates(params, updates), opt

  x, ctx = inputs(3)
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), jnp.asarray(x, jnp.float32),
                                                    ctx).compile().as_text()
  table = f"f32[{N_KEYS ** 2},{D}]{{1,0}}"
  write = "scatter" if rows == "xla" else 'custom_call_target="pmem_row_adam"'
  writes = [ln for ln in hlo.splitlines() if table in ln and write in ln]
  assert f"{table} parameter(" in hlo and writes
  assert not [ln for ln in hlo.splitlines() if f"{table} copy(" in ln]


def trainer_sgd(update: str, *commands: str) -> dict[str, np.ndarray]:
  sets = (f"set:train.optim.tables.update='{update}'", "set:train.optim.tables.optimizer='sgd'",
          "set:train.optim.tables.weight_decay=0.0", "set:train.optim.eps=1.0", "set:train.steps=3",
          "set:train.progress=False", "set:eval.valid_batches=0", "set:train.seq_len=32", "set:train.batch_size=8")
  t = Trainer(fdl.build(cli.build_config([*commands, *sets])))
  t.run()
  return table_params(t)


@pytest.mark.slow
@pytest.mark.parametrize("commands", [
    ("config:pkm_tiny", "set:model.d_model=32"),
    ("config:tiny", "set:model.n_layers=3", "set:model.d_model=32", "fiddler:memory_plus(layers=(1, 2), "
     "n_keys=64, shared_values=True)"),
], ids=["pkm_tiny", "shared_values"])
def test_row_sparse_sgd_equals_dense_sgd_in_the_trainer(commands):
  rows, dense = trainer_sgd("row_sparse", *commands), trainer_sgd("dense", *commands)
  assert rows.keys() == dense.keys()
  for name, want in dense.items():
    np.testing.assert_allclose(rows[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pkm_tiny", "memory_plus_tiny"])
def test_tiny_config_trains_with_falling_loss(name, tmp_path):
  cfg = cli.build_config([f"config:{name}", "set:train.steps=12", "set:train.progress=False",
                          "set:eval.valid_batches=0", "set:train.batch_size=8"])
  t = Trainer(fdl.build(cfg), str(tmp_path))
  summary = t.run()
  losses = read_losses(tmp_path)
  assert np.isfinite(summary["final_loss"]) and len(losses) == 12
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  assert t.summary_header()["params_total"] == t.cost.params
