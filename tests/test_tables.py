"""T1: row-sparse table optimizers (equivalence with dense optax, lazy Adam), tapped reads from
token-indexed and computed ids inside the Trainer, row-sharded tables, host-resident tables,
checkpoint resume."""

import dataclasses
import functools
import shutil

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from configs import cli
from kernels import common, native
from pmem.core import accounting, mesh as mesh_lib, variables
from pmem.core.variables import MemoryTable
from pmem.memory import lookup
from pmem.models import LayerOverride
from pmem.train import host_tables, loop, optim, sparse
from pmem.train.loop import Trainer
from tests.conftest import needs_devices
from tests.tolerances import assert_close

# ------------------------------------------------------------------------------ toy modules


class TokenTable(nnx.Module):
  """STEM-like: a row per token id, read through the lookup function, gating the hidden state."""

  def __init__(self, d_model: int, vocab: int = 256, *, rngs: nnx.Rngs, **_):
    self.vocab, self.d = vocab, d_model
    self.table = MemoryTable(0.02 * jax.random.normal(rngs.params(), (vocab, d_model)), axes=("table_rows", "embed"),
                             index="inputs")

  def __call__(self, x, ctx):
    return x * lookup.gather(self.table, ctx.ids)

  def cost(self, seq_len):
    return accounting.lookup(self.vocab, self.d, rows_read=1)


class TopKTable(nnx.Module):
  """PKM-like: ids computed in the forward (top-k of x @ keys), read as a softmax-weighted bag."""

  def __init__(self, d_model: int, rows: int = 512, k: int = 4, *, rngs: nnx.Rngs, **_):
    self.rows, self.d, self.k = rows, d_model, k
    self.keys = nnx.Param(jax.random.normal(rngs.params(), (d_model, rows)) / d_model ** 0.5, axes=("embed", None))
    self.values = MemoryTable(0.02 * jax.random.normal(rngs.params(), (rows, d_model)), axes=("table_rows", "embed"))

  def __call__(self, x, ctx):
    b, t, d = x.shape
    scores, ids = jax.lax.top_k((x.reshape(b * t, d) @ self.keys[...]).reshape(b, t, -1), self.k)
    return lookup.bag(self.values, ids, jax.nn.softmax(scores, -1))

  def cost(self, seq_len):
    return accounting.dense(self.d, self.rows) + accounting.lookup(self.rows, self.d, rows_read=self.k)


def trainer(*sets, overrides, steps=3, workdir=None) -> Trainer:
  cfg = cli.build_config(["config:tiny", f"set:train.steps={steps}", "set:train.progress=False",
                          "set:eval.valid_batches=0", "set:model.n_layers=2", "set:model.d_model=32",
                          "set:train.seq_len=32", "set:train.batch_size=8", *sets])
  exp = fdl.build(cfg)
  return Trainer(dataclasses.replace(exp, model=dataclasses.replace(exp.model, overrides=overrides)), workdir)


BOTH = (LayerOverride(layers=(0, 1), augment=(TokenTable, TopKTable)),)  # stacked [2, V, D] tables, scanned


def table_params(t: Trainer) -> dict[str, np.ndarray]:
  return {sparse.name_of(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(t.train_state["params"])}


# ------------------------------------------------------------------------ optimizer equivalence


class Toy(nnx.Module):
  """A table read by given ids, scaled by ``w`` (a trained Param, or a constant Variable)."""

  def __init__(self, rows=64, d=8, w=nnx.Param):
    self.t = MemoryTable(jax.random.normal(jax.random.key(0), (rows, d)), axes=("table_rows", "embed"))
    self.w = w(jnp.linspace(0.5, 1.5, d))

  def __call__(self, ids):
    return lookup.gather(self.t, ids) * self.w[...]


def split(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p: nnx.merge(graphdef, p, rest)), params


def toy_train(update, ids_per_step, rows=64, w=nnx.Param, **table):
  """Params after training Toy on the given ids with ``update`` (dense: optax on dense gradients)."""
  merge, params = split(Toy(rows, w=w))
  cfg = optim.OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, clip_norm=None,
                          tables=optim.TableOptimConfig(**{"update": update, "clip_norm": None, **table}))
  tx = optim.Optimizer(cfg, len(ids_per_step))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt, ids):
    (_, _), grads = sparse.value_and_grad(lambda p: loss(merge(p)(ids)), params, tx.row_sparse)
    updates, opt = tx.update(grads, opt, params)
    return tx.apply_updates(params, updates), opt

  opt = tx.init(params)
  for ids in ids_per_step:
    params, opt = step(params, opt, jnp.asarray(ids))
  return np.asarray(params["t"][...]), np.asarray(merge(params).w[...])


def loss(y):
  return (jnp.sin(y) ** 2).sum(), {}


RANDOM_IDS = [np.random.default_rng(i).integers(0, 64, (5, 7)) for i in range(4)]  # duplicates, untouched rows
ALL_ROWS = [np.random.default_rng(i).permutation(np.repeat(np.arange(64), 2)).reshape(8, 16) for i in range(4)]


def test_compact_rows_hold_at_most_the_table_rows():
  """More reads than table rows: min(N, V) slots; every row touched plus unread probes (-1) and ids
  past the table, whose run would be slot V, are dropped."""
  ids = jnp.asarray([3, -1, 0, 2, 3, 7, 1, 0, 2, 3], jnp.int32)
  g = jnp.asarray(np.random.default_rng(0).normal(size=(10, 5)), jnp.float32)
  r = jax.jit(sparse.compact, static_argnums=2)(ids, g, 4)
  assert r.ids.shape == (4,) and r.rows.shape == (4, 5)
  np.testing.assert_array_equal(r.ids, [0, 1, 2, 3])
  want = np.zeros((4, 5), np.float32)
  for i, row in zip(np.asarray(ids), np.asarray(g)):
    if 0 <= i < 4:
      want[i] += row
  np.testing.assert_array_equal(r.rows, want)  # occurrence order: the same float32 sums
  wide = sparse.compact(ids[:3], g[:3], 4)  # fewer reads than rows: N slots, padding V
  np.testing.assert_array_equal(wide.ids, [0, 3, 4])


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adagrad_rowwise"])
def test_row_sparse_equals_dense_for_sgd_and_adagrad(optimizer, clip):
  # lazy and dense agree for these optimizers: untouched rows have zero gradient, and a touched
  # row's gradient is the same float32 sum in occurrence order (sparse.compact, XLA's scatter-add):
  # bit for bit without clipping. Clipping scales a step's table gradient by clip/‖g‖, with ‖g‖²
  # summed in another order (compact rows vs the dense table; zeros add exactly): n = 35·8 squares,
  # so the clip factors differ by ≤ (n − 1)·eps/2 relative (the two-orders bound, halved by the
  # root) and the updates by twice that (adagrad divides by the clipped squares) times their size:
  # ≤ lr·clip (sgd), lr (adagrad: |g| ≤ √Σg²), lr·√d (row-wise: g over the row's root mean square).
  # Over the steps, plus one rounding of |p| ≤ max|p| per step: terms = steps·(1 + lr·√d·(n − 1) / max|p|).
  dense = toy_train("dense", RANDOM_IDS, optimizer=optimizer, clip_norm=clip)
  rows = toy_train("row_sparse", RANDOM_IDS, optimizer=optimizer, clip_norm=clip)
  if clip is None:
    np.testing.assert_array_equal(rows[0], dense[0])
    np.testing.assert_array_equal(rows[1], dense[1])
    return
  steps, n, lr, d, scale = len(RANDOM_IDS), RANDOM_IDS[0].size * 8, 0.1, 8, np.abs(dense[0]).max()
  terms = steps * (1 + lr * d ** 0.5 * (n - 1) / scale)
  assert_close(rows[0], dense[0], terms=terms, scale=scale)
  assert_close(rows[1], dense[1], terms=terms, scale=scale)  # w (not clipped) reads the tables' differences


def test_row_sparse_sgd_equals_optax_sgd():
  merge, p = split(Toy(w=nnx.Variable))
  tx = optax.sgd(optim.schedule(optim.OptimConfig(lr=0.1, warmup_steps=0), len(RANDOM_IDS)))

  @jax.jit
  def step(p, opt, ids):
    updates, opt = tx.update(jax.grad(lambda q: loss(merge(q)(ids))[0])(p), opt)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(p)
  for ids in RANDOM_IDS:
    p, opt = step(p, opt, jnp.asarray(ids))
  rows = toy_train("row_sparse", RANDOM_IDS, w=nnx.Variable, optimizer="sgd")[0]
  np.testing.assert_array_equal(rows, p["t"][...])  # bitwise: the same occurrence-order sums, p − lr·g


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_row_sparse_adam_equals_dense_adam_when_every_row_is_touched(optimizer):
  kw = dict(optimizer=optimizer, weight_decay=0.01, lr_mult=2.0)
  dense, rows = toy_train("dense", ALL_ROWS, **kw), toy_train("row_sparse", ALL_ROWS, **kw)
  # the same Adam formulas in two programs (no reductions: a row's 2 reads sum in occurrence order
  # in both; multiply-adds contract into FMAs by expression shape): a few roundings per step, and a
  # near-zero entry cancels only p0 against 4 steps of ≤ lr·lr_mult = 0.2: 8·eps·1 ≈ 1e-6 abs + rel
  np.testing.assert_allclose(rows[0], dense[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rows[1], dense[1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(toy_train("dense", RANDOM_IDS, **kw)[0], toy_train("row_sparse", RANDOM_IDS, **kw)[0])


def test_lazy_adam_by_hand():
  # table [3, 1], loss = sum of the rows read (gradient 1 per occurrence); lr 0.1, betas .5/.5,
  # eps 0, weight decay 0.1 (decoupled, adamw), table lr x2
  merge, params = split(Toy(rows=3, d=1, w=nnx.Variable))
  p0 = np.asarray(params["t"][...])[:, 0].astype(np.float64)
  cfg = optim.OptimConfig(lr=0.1, warmup_steps=0, min_lr_ratio=1.0, clip_norm=None, eps=0.0,
                          tables=optim.TableOptimConfig(update="row_sparse", optimizer="adamw", b1=0.5, b2=0.5,
                                                        weight_decay=0.1, lr_mult=2.0, clip_norm=None))
  tx = optim.Optimizer(cfg, 3)

  @jax.jit
  def step(params, opt, ids):
    (_, _), grads = sparse.value_and_grad(lambda q: (merge(q)(ids).sum(), {}), params, tx.row_sparse)
    updates, opt = tx.update(grads, opt, params)
    return tx.apply_updates(params, updates), opt

  opt = tx.init(params)
  for ids in ([0, 0, 1], [0], [0, 1]):
    params, opt = step(params, opt, jnp.asarray(ids))
  # row 0: gradients 2, 1, 1 on steps 1-3; row 1: 1 on steps 1 and 3 (its count is 2, and its
  # moments skip step 2); row 2: untouched, so no weight decay either
  lr, p = 0.2, p0.copy()
  for r, gs in ((0, [2.0, 1.0, 1.0]), (1, [1.0, 1.0])):
    m = v = 0.0
    for c, g in enumerate(gs, 1):
      m, v = 0.5 * m + 0.5 * g, 0.5 * v + 0.5 * g * g
      p[r] -= lr * ((m / (1 - 0.5 ** c)) / np.sqrt(v / (1 - 0.5 ** c)) + 0.1 * p[r])
  # float32 vs float64 by hand: 3 steps of ~3 roundings at |p| (the update, the decay, the step)
  assert_close(np.asarray(params["t"][...])[:, 0], p, terms=9)
  np.testing.assert_array_equal(np.asarray(opt["rows"]["count"]["t"][...]), [3, 2, 0])


@pytest.mark.parametrize("optimizer,weight_decay,clip_norm,lead", [
    ("adam", 0.0, None, ()), ("adamw", 0.01, 0.5, ()), ("adam", 0.01, 0.5, (3,)), ("adamw", 0.0, 100.0, (2,))])
def test_native_row_adam_matches_xla(optimizer, weight_decay, clip_norm, lead):
  """pmem_row_adam (fused, in place) against XLA's gather / row_step / scatter: touched rows within
  float32 rounding (XLA contracts multiply-adds into FMAs by expression shape), counts, untouched
  rows and padding exact; clipping active for clip norm 0.5 (global norm 2)."""
  rng = np.random.default_rng(0)
  v, d, u = 64, 40, 30
  cfg = optim.TableOptimConfig(update="row_sparse", optimizer=optimizer, weight_decay=weight_decay,
                               clip_norm=clip_norm)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  table = normal(*lead, v, d)
  state = {"mu": 0.1 * normal(*lead, v, d), "nu": jnp.asarray(0.1 * rng.random((*lead, v, d)), jnp.float32),
           "count": jnp.asarray(rng.integers(0, 5, (*lead, v)), jnp.int32)}
  uniq = [np.unique(rng.integers(0, v, u)) for _ in range(int(np.prod(lead)))]
  ids = jnp.asarray(np.stack([np.pad(i, (0, u - i.size), constant_values=v) for i in uniq]).reshape(*lead, u))
  g = normal(*lead, u, d) * (ids < v)[..., None]
  out = {}
  for impl in ("xla", "native"):
    c = dataclasses.replace(cfg, implementation=impl)
    assert sparse.implementation(c, jnp.float32) == impl
    step = jax.jit(lambda t, s, i, g, lr, norm: sparse.update_rows(c, 1e-8, t, s, sparse.Rows(i, g), lr, norm))
    out[impl] = jax.device_get(step(table, state, ids, g, jnp.float32(0.01), jnp.float32(2.0)))
  (wx, sx), (wn, sn) = out["xla"], out["native"]
  touched = np.stack([np.isin(np.arange(v), i) for i in uniq]).reshape(*lead, v)
  for name, x, n, before in [("table", wx.table, wn.table, table), ("mu", sx["mu"], sn["mu"], state["mu"]),
                             ("nu", sx["nu"], sn["nu"], state["nu"])]:
    # one elementwise step (no reductions: the clip norm is an input), fused differently: a few
    # roundings per entry, 1e-6 ≈ 8·eps relative; atol 1e-7 ≈ eps·|operands| for entries that cancel
    # (b1·mu against (1 − b1)·g, both ≲ 0.4; a table entry moves by ≤ lr·|update| ≲ 0.03)
    np.testing.assert_allclose(n[touched], x[touched], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(n[~touched], np.asarray(before)[~touched], err_msg=name)
    assert not np.array_equal(n[touched], np.asarray(before)[touched]), name
  np.testing.assert_array_equal(sn["count"], sx["count"])
  np.testing.assert_array_equal(sn["count"], np.asarray(state["count"]) + touched)
  assert_close(wn.norm_sq, wx.norm_sq, terms=u * d)  # Σ g² over u·d entries per layer, in another order


@needs_devices(2)
def test_row_update_implementation_is_checked():
  cfg = optim.TableOptimConfig(implementation="native")
  with pytest.raises(ValueError, match="implementation must be one of"):
    optim.Optimizer(optim.OptimConfig(tables=optim.TableOptimConfig(implementation="fast")), 10)
  with pytest.raises(common.Unavailable, match="optimizer 'sgd'"):
    sparse.implementation(dataclasses.replace(cfg, optimizer="sgd"), jnp.float32)
  with pytest.raises(common.Unavailable, match="bfloat16 tables"):
    sparse.implementation(cfg, jnp.bfloat16)
  with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
    with pytest.raises(common.Unavailable, match="a mesh of 2 devices"):
      sparse.implementation(cfg, jnp.float32)
    assert sparse.implementation(dataclasses.replace(cfg, implementation="auto"), jnp.float32) == "xla"
  native_here = "native" if native.available() is None else "xla"
  assert sparse.implementation(dataclasses.replace(cfg, implementation="auto"), jnp.float32) == native_here
  assert sparse.implementation(dataclasses.replace(cfg, implementation="auto", optimizer="sgd"), jnp.float32) == "xla"


def test_row_sparse_step_has_no_table_sized_temporaries():
  rows, d = 1 << 16, 64
  merge, params = split(Toy(rows, d))
  ids = jnp.zeros((32, 32), jnp.int32)
  table_bytes = rows * d * 4
  bounds = {"row_sparse": lambda temp: temp < table_bytes / 8, "dense": lambda temp: temp >= table_bytes}
  for update, bound in bounds.items():
    tx = optim.Optimizer(optim.OptimConfig(tables=optim.TableOptimConfig(update=update)), 10)

    def step(params, opt, ids):
      (_, _), grads = sparse.value_and_grad(lambda p: loss(merge(p)(ids)), params, tx.row_sparse)
      updates, opt = tx.update(grads, opt, params)
      return tx.apply_updates(params, updates), opt

    abstract = jax.eval_shape(lambda: (params, tx.init(params)))
    mem = jax.jit(step, donate_argnums=(0, 1)).lower(*abstract, ids).compile().memory_analysis()
    assert bound(mem.temp_size_in_bytes), (update, mem.temp_size_in_bytes)
    assert mem.alias_size_in_bytes >= 3 * table_bytes  # table, mu, nu updated in place


def test_auto_picks_by_rows():
  tx = optim.Optimizer(optim.OptimConfig(tables=optim.TableOptimConfig(sparse_min_rows=100)), 10)
  small, big = (MemoryTable(jnp.zeros((n, 4)), axes=("table_rows", "embed")) for n in (99, 100))
  assert not tx.row_sparse("a", small) and tx.row_sparse("b", big)
  stacked = MemoryTable(jnp.zeros((3, 100, 4)), axes=("table_rows", "embed"))  # rows after stacked dims
  assert tx.row_sparse("c", stacked)


def test_plain_read_of_a_row_sparse_table_raises():
  merge, params = split(Toy())

  def bad(p):
    m = merge(p)
    return jnp.take(m.t[...], jnp.zeros((3,), jnp.int32), axis=0).sum(), {}

  tx = optim.Optimizer(optim.OptimConfig(tables=optim.TableOptimConfig(update="row_sparse")), 10)
  with pytest.raises(TypeError, match="MemoryTable 't' is updated row-sparse: read it with pmem.memory.lookup"):
    sparse.value_and_grad(bad, params, tx.row_sparse)


def test_stacked_tables_and_bag_weights():
  # a [2, V, D] table inside a scan, read as a bag: row grads per layer, weight grads intact
  class Bag(nnx.Module):
    def __init__(self):
      self.t = MemoryTable(jax.random.normal(jax.random.key(1), (2, 16, 4)), axes=("table_rows", "embed"))

  graphdef, params = nnx.split(Bag(), nnx.Param)
  ids = jnp.array([[1, 3], [3, 3], [0, 15]])

  def f(p, w):
    gd, st = nnx.split(nnx.merge(graphdef, p).t)
    body = lambda h, s: (h + jnp.sin(lookup.bag(nnx.merge(gd, s), ids, w)).sum(), None)
    return jax.lax.scan(body, 0.0, st)[0]

  w = jnp.array([[0.5, 2.0], [1.0, -1.0], [3.0, 0.25]])
  (_, _), grads = sparse.value_and_grad(lambda p: (f(p, w), {}), params, lambda name, v: True)
  dense = jax.grad(f)(params, w)["t"][...]
  rows = grads["t"].get_value()
  got = jax.vmap(lambda r: jnp.zeros((17, 4)).at[r.ids].add(r.rows)[:16])(rows)
  assert_close(got, dense, terms=ids.size)  # a row's gradient: ≤ 6 reads' w·cos(·) summed in another order
  assert rows.ids.shape == (2, 6) and sorted(np.asarray(rows.ids[0][:4])) == [0, 1, 3, 15]


# ------------------------------------------------------------------------------- the Trainer


TRAINER_SETS = ("set:train.optim.tables.update='row_sparse'", "set:train.optim.tables.optimizer='sgd'",
                "set:train.optim.tables.lr_mult=10.0")
TOKEN, VALUES = "stages/0/blocks/aug/0/table", "stages/0/blocks/aug/1/values"


@pytest.fixture(scope="module")
def row_sparse_run():
  """A Trainer run with a token-indexed and a computed-ids (top-k) table, both row-sparse and
  stacked over 2 scanned layers: (trainer, params before, params after)."""
  t = trainer(*TRAINER_SETS, overrides=BOTH)
  before = table_params(t)
  t.run()
  return t, before, table_params(t)


def test_tables_train_row_sparse_and_from_the_host_in_the_trainer(row_sparse_run):
  rs, before, after = row_sparse_run
  assert after[VALUES].shape == (2, 512, 32)
  for name in (TOKEN, VALUES):
    changed = np.any(after[name] != before[name], axis=-1)
    assert 0 < changed.sum() < changed.size, name  # some rows move, untouched ones do not
  # the host run keeps the token table on the host: the budget fits only the top-k table
  budget = host_tables.state_bytes(rs.tx, rs.train_state["params"]["stages"][0]["blocks"]["aug"][1]["values"])
  host = trainer(*TRAINER_SETS, f"set:train.optim.tables.device_budget_bytes={budget}", overrides=BOTH)
  assert set(host.host.tables) == {TOKEN} and host.params_total == rs.params_total
  host.run()
  got = table_params(host) | {TOKEN: host.host.tables[TOKEN]}
  for name in after:  # host-resident == device-resident, bitwise
    np.testing.assert_array_equal(got[name], after[name], err_msg=name)


@pytest.mark.slow
def test_row_sparse_sgd_equals_dense_sgd_in_the_trainer(row_sparse_run):
  _, _, after = row_sparse_run
  dense = trainer(*TRAINER_SETS, "set:train.optim.tables.update='dense'", overrides=BOTH)
  dense.run()
  for name, want in table_params(dense).items():  # AdamW on the dense parameters turns last-bit
    # gradient differences into ~1e-6 absolute ones
    np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------- host placement

TOKENS = (LayerOverride(layers=(0, 1), augment=(TokenTable,)),)
TOKEN_NAME = "stages/0/blocks/aug/0/table"


def test_host_placement_refuses_tables_whose_ids_are_computed_in_the_forward():
  with pytest.raises(ValueError, match="their ids are computed in the forward"):
    trainer("set:train.optim.tables.update='row_sparse'", "set:train.optim.tables.device_budget_bytes=0",
            overrides=(LayerOverride(layers=(0,), augment=(TopKTable,)),))


def host_store(max_unique=4):
  tx = optim.Optimizer(optim.OptimConfig(tables=optim.TableOptimConfig(update="row_sparse")), 10)
  table = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)  # two stacked layers
  return host_tables.HostTables(tx.with_host({"t": 10}), {"t": table}, {"t": "inputs"}, max_unique)


def test_host_staging_dedups_bounds_and_refreshes_rows_written_after_staging():
  for x in (np.array([[7, 2, 7], [2, 9, 9]]), np.zeros(0, np.int32), np.array([3])):
    np.testing.assert_array_equal(variables.unique(x), np.unique(x))
  host = host_store()
  staged = host.stage({"inputs": np.array([[7, 2, 7], [2, 9, 9]])})["t"]
  np.testing.assert_array_equal(staged["slots"], [[2, 7, 9, 10]] * 2)
  np.testing.assert_array_equal(staged["rows"][1, :3], host.tables["t"][1, [2, 7, 9]])
  assert not staged["rows"][:, 3].any()
  with pytest.raises(ValueError, match="5 unique ids, more than the 4 staged rows"):
    host.stage({"inputs": np.arange(5)})
  host.tables["t"][:, 7] = -1.0  # an update written after the staging
  refreshed = host._refresh({"t": staged}, {"t": np.array([7, 8])})["t"]
  np.testing.assert_array_equal(refreshed["rows"][:, 1], -np.ones((2, 3)))
  np.testing.assert_array_equal(refreshed["rows"][:, 0], host.tables["t"][:, 2])


@pytest.mark.skipif(native.available() is not None, reason="native kernels unavailable")
@pytest.mark.parametrize("optimizer, weight_decay, clip_norm", [("adam", 0.0, None), ("adam", 0.1, 1.0),
                                                                ("adamw", 0.1, 1e-3)])
def test_host_native_update_equals_the_gathered_update_bitwise(optimizer, weight_decay, clip_norm):
  # the one native pass over the host table vs its rows gathered, updated as a table, scattered back
  v, d, u = 300, 8, 64
  cfg = optim.TableOptimConfig(update="row_sparse", optimizer=optimizer, weight_decay=weight_decay, clip_norm=clip_norm)
  tx = optim.Optimizer(optim.OptimConfig(tables=cfg), 10).with_host({"t": v})
  assert sparse.implementation(cfg, jnp.float32) == "native"
  table = np.random.default_rng(0).standard_normal((2, v, d), dtype=np.float32)  # two stacked layers
  fused, gathered = (host_tables.HostTables(tx, {"t": table.copy()}, {"t": "inputs"}, u) for _ in range(2))
  for h in (fused, gathered):
    h.state["t"]["count"][:, :100] = 5000  # past the first table of bias corrections: it grows
  rng = np.random.default_rng(1)
  for step in range(4):
    ids, g = np.full((2, u + 4), v, np.int32), np.zeros((2, u + 4, d), np.float32)  # slots past u: padding
    for i in range(2):
      x = np.unique(rng.integers(0, v, u))
      ids[i, :x.size], g[i, :x.size] = x, rng.standard_normal((x.size, d))
    out = {"grads": {"t": sparse.Rows(ids, g)}, "lr": np.float32(0.01), "norm": np.float32(0.5 + step)}
    written = fused.apply(out)
    gathered._gathered("t", ids[:, :u], g[:, :u], out["lr"], out["norm"])
    np.testing.assert_array_equal(written["t"], np.unique(ids[ids < v]))
  assert len(fused.bc) > 5004 and fused.state["t"]["count"].max() > 5001  # counts past the first table
  np.testing.assert_array_equal(fused.tables["t"], gathered.tables["t"])
  for k in ("mu", "nu", "count"):
    np.testing.assert_array_equal(fused.state["t"][k], gathered.state["t"][k], err_msg=k)


def test_prefetch_stages_ahead_and_reports_the_position_of_the_next_batch():
  class It:  # a checkpointable iterator over numbered batches
    def __init__(self):
      self.i = 0
    def __next__(self):
      if self.i == 3:
        raise StopIteration
      self.i += 1
      return {"inputs": np.array([self.i])}
    def get_state(self):
      return {"i": self.i}
    def set_state(self, s):
      self.i = s["i"]

  host = host_store()
  it = host.prefetch(It())
  assert next(it)["inputs"][0] == 1 and it.get_state() == {"i": 1}  # batch 2 is being staged
  assert host.ahead.staged.result()["t"]["slots"][0, 0] == 2 and len(host.pending) == 1
  it.set_state({"i": 2})
  assert next(it)["inputs"][0] == 3 and host.ahead is None
  with pytest.raises(StopIteration):
    next(it)


# ---------------------------------------------------------------------------- row sharding


def sharded_train(mesh_cfg, ids_per_step, rows=1024, d=16):
  """Row-sparse AdamW on Toy under a mesh (rows sharded by the rules: table_rows -> fsdp)."""
  mesh = mesh_lib.make_mesh(mesh_cfg)
  merge, params = split(Toy(rows, d))
  tx = optim.Optimizer(optim.OptimConfig(lr=0.1, warmup_steps=0, tables=optim.TableOptimConfig(
      update="row_sparse", weight_decay=0.01)), len(ids_per_step))

  def step(params, opt, ids):
    (_, _), grads = sparse.value_and_grad(lambda q: loss(merge(q)(ids)), params, tx.row_sparse)
    updates, opt = tx.update(grads, opt, params)
    return tx.apply_updates(params, updates), opt

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(lambda: params)
    p_sh, replicated = loop.param_shardings(mesh, abstract), NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sh = tx.row_state_shardings(loop.shardings_like(abstract_opt, abstract, p_sh, replicated), p_sh)
    ids_sh = NamedSharding(mesh, P(("data", "fsdp")))
    f = jax.jit(step, in_shardings=(p_sh, opt_sh, ids_sh), out_shardings=(p_sh, opt_sh), donate_argnums=(0, 1))
    p = jax.device_put(params, p_sh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(p)
    hlo = f.lower(p, opt, jax.ShapeDtypeStruct(ids_per_step[0].shape, jnp.int32, sharding=ids_sh)).compile().as_text()
    for ids in ids_per_step:
      p, opt = f(p, opt, jax.device_put(jnp.asarray(ids, jnp.int32), ids_sh))
  return p, opt, hlo


@needs_devices(8)
def test_row_sharded_tables_match_one_device_and_hold_rows_over_axis_size():
  ids = [np.random.default_rng(i).integers(0, 1024, (64,)) for i in range(3)]
  p1, o1, _ = sharded_train(mesh_lib.MeshConfig(), ids)
  p8, o8, hlo = sharded_train(mesh_lib.MeshConfig(fsdp=8), ids)
  # the same per-read gradients; the table's clip norm sums its n = 64·16 squares in another order
  # (over shards), so the clip factors c differ by ≤ (n − 1)·eps/2 relative. Adam's step m̂/√v̂ does
  # not see c: the tables differ by a few roundings per step, and an entry cancels only against
  # ≤ 3 steps of ≤ lr = 0.1 (8·eps·|p| ≲ 1e-5 relative, 1e-6 absolute). nu, an average of (c·g)²,
  # carries c² (≤ (n − 1)·eps relative) and the later gradients' differences: terms = n.
  np.testing.assert_allclose(np.asarray(p8["t"][...]), np.asarray(p1["t"][...]), rtol=1e-5, atol=1e-6)
  assert_close(np.asarray(o8["rows"]["nu"]["t"][...]), np.asarray(o1["rows"]["nu"]["t"][...]), terms=64 * 16)
  np.testing.assert_array_equal(np.asarray(o8["rows"]["count"]["t"][...]), np.asarray(o1["rows"]["count"]["t"][...]))
  for x in (p8["t"][...], o8["rows"]["mu"]["t"][...], o8["rows"]["nu"]["t"][...], o8["rows"]["count"]["t"][...]):
    assert len(x.addressable_shards) == 8 and all(s.data.shape[0] == 1024 // 8 for s in x.addressable_shards)
  collectives = [line for line in hlo.splitlines()
                 if any(c in line for c in ("all-gather(", "all-reduce(", "all-to-all("))]
  assert collectives and not [line for line in collectives if "[1024," in line]  # no table-sized exchange


# ---------------------------------------------------------------------------- checkpoints


def resume_equals_uninterrupted(tmp_path, *sets, overrides):
  """Trains 4 steps saving every 2, drops the step-4 checkpoint, resumes from step 2 in a new
  Trainer: the resumed parameters (device and host) equal the uninterrupted ones bitwise."""
  sets = (*sets, "set:checkpoint.every=2")
  t = trainer(*sets, overrides=overrides, steps=4, workdir=str(tmp_path))
  t.run()
  want = table_params(t) | ({f"host/{n}": x.copy() for n, x in t.host.tables.items()} if t.host else {})
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  r = trainer(*sets, overrides=overrides, steps=4, workdir=str(tmp_path))
  assert r.start_step == 2
  r.run()
  got = table_params(r) | ({f"host/{n}": x for n, x in r.host.tables.items()} if r.host else {})
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  return r


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["set:mesh.fsdp=1", pytest.param("set:mesh.fsdp=8", marks=needs_devices(8))])
def test_row_sparse_resume_is_bitwise(tmp_path, mesh):
  r = resume_equals_uninterrupted(tmp_path, mesh, "set:train.optim.tables.update='row_sparse'", overrides=BOTH)
  table = r.train_state["params"]["stages"][0]["blocks"]["aug"][0]["table"][...]
  fsdp = r.exp.mesh.fsdp
  assert {s.data.shape for s in table.addressable_shards} == {(2, 256 // fsdp, 32)}


@pytest.mark.slow
def test_host_resume_is_bitwise(tmp_path):
  r = resume_equals_uninterrupted(tmp_path, "set:train.optim.tables.update='row_sparse'",
                                  "set:train.optim.tables.device_budget_bytes=0", overrides=TOKENS)
  assert set(r.host.tables) == {TOKEN_NAME}


def test_benchmark_model_trains_the_same_from_the_host_and_the_device():
  # the benchmark's train loop (make_train_step, prefetch, host apply) at a small size
  from experiments.bench import tables as bench
  dev, _, _, _ = bench.train(1 << 12, "row_sparse", 4)
  state, host, _, _ = bench.train(1 << 12, "host", 4)
  # bitwise: the host applies the same row updates (pmem.train.sparse: host and device stay bitwise equal)
  np.testing.assert_array_equal(host.tables["table"], np.asarray(dev["params"]["table"][...]))
  np.testing.assert_array_equal(np.asarray(state["params"]["w"][...]), np.asarray(dev["params"]["w"][...]))
  dense, _, _, _ = bench.train(1 << 12, "dense", 4)
  assert not np.array_equal(np.asarray(dense["params"]["table"][...]), host.tables["table"])  # lazy vs dense AdamW
