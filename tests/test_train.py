"""Optimizer routing by variable type, separate clipping, the NaN guard, and the trainer's stages."""

import dataclasses
import functools
import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core import accounting
from pmem.core.variables import MemoryTable
from pmem.models import LayerOverride
from pmem.train import optim
from pmem.train.loop import Trainer
from tests.tolerances import assert_close


class TokenTable(nnx.Module):
  """A minimal channel mixer with a MemoryTable (the protocol, as STEM/Engram will use it)."""

  def __init__(self, d_model: int, vocab: int = 256, *, rngs: nnx.Rngs, **_):
    self.vocab, self.d = vocab, d_model
    self.table = MemoryTable(0.02 * jax.random.normal(rngs.params(), (vocab, d_model)), axes=("table_rows", "embed"))

  def __call__(self, x, ctx):
    return x * jnp.take(self.table[...], ctx.ids, axis=0)

  def cost(self, seq_len):
    return accounting.lookup(self.vocab, self.d, rows_read=1)


def trainer(*sets, steps=3) -> Trainer:
  cfg = cli.build_config(["config:tiny", f"set:train.steps={steps}", "set:train.progress=False",
                          "set:eval.valid_batches=0", *sets])
  exp = fdl.build(cfg)
  over = LayerOverride(layers=(1,), augment=(functools.partial(TokenTable),))
  return Trainer(dataclasses.replace(exp, model=dataclasses.replace(exp.model, overrides=(over,))))


def table_and_dense(t: Trainer):
  p = t.train_state["params"]
  return np.asarray(p["stages"][1]["blocks"][0]["aug"][0]["table"][...]), np.asarray(p["head"][...])


@pytest.mark.parametrize("lr_mult", [0.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_tables_get_their_own_learning_rate(lr_mult):
  t = trainer(f"set:train.optim.tables.lr_mult={lr_mult}")
  table0, head0 = table_and_dense(t)
  t.run()
  table1, head1 = table_and_dense(t)
  assert not np.allclose(head0, head1)  # AdamW steps of ~lr = 3e-3 per entry, far above allclose's 1e-5
  assert np.array_equal(table0, table1) == (lr_mult == 0.0)
  assert t.summary_header()["params_total"] == t.cost.params  # the protocol's count is exact


def test_tables_are_clipped_separately():
  cfg = optim.OptimConfig(lr=1.0, warmup_steps=0, eps=1e3, weight_decay=0.0, clip_norm=1.0,
                          tables=optim.TableOptimConfig(clip_norm=1.0))
  tx, _ = optim.build(cfg, 10)

  class M(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4,)), axes=("embed",))
      self.t = MemoryTable(jnp.zeros((4,)), axes=("table_rows",))

  params = nnx.state(M(), nnx.Param)
  g = jax.tree.map(lambda x: x, params)
  g["w"][...] = jnp.full((4,), 0.25)  # norm 0.5: below its clip
  g["t"][...] = jnp.full((4,), 50.0)  # norm 100: clipped to 1
  up, _ = tx.update(g, tx.init(params), params)
  # step 0 of the cosine schedule is lr=1; Adam's first update is -g/(|g| + eps). float32 vs the
  # float64 formula: ~10 roundings on the way (the clip, the moments and their bias corrections, the
  # root, eps, the division), each relative to values of one sign
  assert_close(up["w"][...], -0.25 / (0.25 + 1e3), terms=10)
  assert_close(up["t"][...], -0.5 / (0.5 + 1e3), terms=10)


def test_nan_loss_stops_with_a_clear_error():
  t = trainer("set:train.optim.lr=1e30", "set:train.optim.clip_norm=None", "set:train.optim.warmup_steps=0",
              steps=6)
  with pytest.raises(FloatingPointError, match=r"(loss|param_norm) is (nan|inf) at step \d"):
    t.run()


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state():
  trained = ("*/seq/*", "*/aug/*/table")  # fnmatch: * crosses /
  t = trainer(f"set:train.trainable={trained!r}")
  before = _flat(t.train_state["params"])
  t.run()
  after = _flat(t.train_state["params"])
  moves = {n for n in before if not np.array_equal(before[n], after[n])}
  assert moves and all("/seq/" in n or "/aug/" in n for n in moves)
  frozen = [n for n in before if "/seq/" not in n and "/aug/" not in n]
  assert frozen and all(np.array_equal(before[n], after[n]) for n in frozen)  # bit for bit
  n_trained = sum(v.size for n, v in before.items() if n not in frozen)
  assert t.summary_header()["params_trainable"] == n_trained < t.params_total
  moments = sum(x.size for x in jax.tree.leaves(t.train_state["opt"]) if x.ndim)  # Adam's mu and nu
  assert moments == 2 * n_trained


def test_frozen_parameters_get_no_gradient():
  """XLA drops the weight gradients of frozen matrices: the step's FLOPs fall by about their matmuls."""
  flops = {}
  for name, sets in (("all", ()), ("head", ("set:train.trainable=('head',)",))):
    t = trainer(*sets)
    batch = t.to_device(next(t.it), t.rows)
    with jax.set_mesh(t.mesh):
      flops[name] = t.step_fn.lower(t.train_state, batch).compile().cost_analysis()["flops"]
  assert flops["head"] < 0.8 * flops["all"], flops


@pytest.mark.parametrize("patterns, message", [(("stages/*/nope",), "matches no parameter"),
                                               ((), "nothing would be trained")])
def test_bad_trainable_patterns_fail_clearly(patterns, message):
  with pytest.raises(ValueError, match=message):
    trainer(f"set:train.trainable={patterns!r}")


def test_the_stages_one_by_one_train_bitwise_as_run(tmp_path):
  """build -> restore -> loop -> report, as a notebook calls them: the losses and train state of Trainer(...).run()."""
  exp = fdl.build(cli.build_config(["config:tiny", "set:train.steps=3", "set:train.progress=False",
                                    "set:eval.valid_batches=0"]))
  run = Trainer(exp, str(tmp_path / "run"))
  summary = run.run()
  staged = Trainer.build(exp, str(tmp_path / "staged"))
  staged.restore()
  outcome = staged.loop()
  timings = {k: outcome[k] for k in ("tokens_per_s", "data_seconds")}
  assert staged.report(outcome) == {**summary, **timings}
  rows = [map(json.loads, (tmp_path / w / "metrics.jsonl").read_text().splitlines()) for w in ("run", "staged")]
  losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
  assert len(losses[0]) == 3 and losses[0] == losses[1]  # bit for bit
  assert json.loads((tmp_path / "staged" / "summary.json").read_text())["final_loss"] == losses[1][-1]
  pairs = zip(jax.tree.leaves(run.train_state), jax.tree.leaves(staged.train_state), strict=True)
  assert all(np.array_equal(a, b) for a, b in pairs)
