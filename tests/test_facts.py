"""Model facts reach every factory (pmem.core.mixer): a size change after a fiddler builds the same
model as the change before it, and a config whose parts disagree is refused in one line."""

import functools

import fiddle as fdl
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import configs
from configs import cli
from configs.base import experiment
from pmem.core import accounting
from pmem.core.mixer import TokenContext
from pmem.core.variables import MemoryTable
from pmem.models import Decoder, LayerOverride
from pmem.models.decoder import facts
from tests import coverage
from tests.conftest import run_launcher

# fiddler -> the commands after config:tiny that exercise it (the ones it needs first included)
CASES = {
    "tied": ("fiddler:tied",),
    "no_scan": ("fiddler:no_scan",),
    "remat": ("fiddler:remat(policy='dots')",),
    "z_loss": ("fiddler:z_loss(weight=0.1)",),
    "stem": ("fiddler:stem",),
    "stem_variant": ("fiddler:stem", "fiddler:stem_variant(variant='additive')"),
    "stem_layers": ("fiddler:stem", "fiddler:stem_layers(schedule='half')"),
    "engram": ("fiddler:engram(layers=(1, 2), heads=2)",),
    "engram_ablation": ("fiddler:engram(layers=(1,), heads=2)", "fiddler:engram_ablation(kind='no_conv')"),
    "engram_shape": ("fiddler:engram(layers=(1,))", "fiddler:engram_shape(max_order=2, heads=4)"),
    "move": ("fiddler:move(n_slots=2)",),
    "move_per_layer": ("fiddler:move(n_slots=1, shared=False)",),
    "lave": ("fiddler:lave",),
    "pkm": ("fiddler:pkm",),
    "memory_plus": ("fiddler:memory_plus(shared_values=True)",),
    "mixer": ("fiddler:mixer(name='gdn')",),
    "titans": ("fiddler:mixer(name='titans')", "fiddler:titans(depth=1, momentum=False)"),
    "swa": ("fiddler:swa(window=8)",),
    "hybrid": ("fiddler:hybrid(pattern='GA', G='mamba2')",),
    "lora": ("fiddler:lora(rank=4)",),
    "dora": ("fiddler:dora(rank=4, targets=('wq', 'w_up'))",),
    "bios_finetune": ("fiddler:bios_finetune(n_people=4)",),  # data only: the model is unchanged
}
# a size change applied after the fiddler (the bug: fiddlers copied these at config time)
CHANGES = ("set:model.vocab=512", "set:model.n_layers=6", "set:model.d_model=96")


def shapes(commands):
  """(every variable's path -> shape, the cost per token) of the model the commands configure."""
  cfg = cli.build_config(["config:tiny", *commands])
  model = nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))
  flat = {"/".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(model))}
  return model, flat, model.cost(cfg.train.seq_len)


def test_every_fiddler_is_covered():
  configs.load_all()
  # match_flops reads the model as it is when applied (it computes a width): it is applied last,
  # after every size change, as the grids do (test_match_flops_after_a_size_change)
  assert set(configs.FIDDLERS) - {"match_flops"} <= {c.split("(")[0].removeprefix("fiddler:")
                                                     for cmds in CASES.values() for c in cmds}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_size_change_after_a_fiddler_equals_one_before_it(case, change):
  after, after_shapes, after_cost = shapes([*CASES[case], change])
  _, before_shapes, before_cost = shapes([change, *CASES[case]])
  assert after_shapes == before_shapes and after_cost == before_cost
  assert_modules_hold_the_facts(after)


def assert_modules_hold_the_facts(model: Decoder) -> None:
  cfg = model.cfg
  for _, m in nnx.iter_graph(model):  # every module sees the model's facts
    if isinstance(m, nnx.Module):
      for fact in ("vocab", "d_model"):
        if hasattr(m, fact) and not isinstance(m, Decoder):
          assert getattr(m, fact) == getattr(cfg, fact), (type(m).__name__, fact)
  for path, v in nnx.to_flat_state(nnx.state(model, MemoryTable)):
    if v.get_metadata().get("index") == "inputs":  # token-indexed: one row per vocabulary id
      assert v.get_value().shape[-2] == cfg.vocab, path


@pytest.mark.parametrize("name", coverage.cases(coverage.first_per(coverage.classes)))
def test_every_registered_config_takes_a_size_change(name):
  """Every registered config (tests/coverage.py: `make test` one per distinct set of module classes), then every
  size change: each module holds the new facts (no factory copied them when the config was written)."""
  cfg = cli.build_config([f"config:{name}", *CHANGES])
  model = nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))
  assert (model.cfg.vocab, model.cfg.n_layers, model.cfg.d_model) == (512, 6, 96)
  assert_modules_hold_the_facts(model)


def test_stale_stem_vocab_now_builds_512_rows():
  """The reported run: stem_tiny, then vocab 512 (and a BPE-512 tokenizer)."""
  model, flat, _ = shapes(["fiddler:stem", "set:model.vocab=512", "set:data.tokenizer.kind='bpe'",
                           "set:data.tokenizer.vocab_size=512"])
  (table,) = [s for p, s in flat.items() if p.endswith("ch/table")]
  assert table == (3, 512, 128)  # layers 1..3 stacked, 512 rows, d_ff of the FFN it replaces


def test_match_flops_after_a_size_change():
  cmds = ["set:model.d_model=96", "fiddler:match_flops(like='stem')"]
  _, _, dense = shapes(cmds)
  _, _, stem = shapes(["set:model.d_model=96", "fiddler:stem"])
  assert abs(dense.flops - stem.flops) <= accounting.dense(96, 1).flops * 3  # within one d_ff step


class Probe(nnx.Module):
  """A zero mixer that records the facts the decoder handed it."""
  seen: list = []

  def __init__(self, d_model, vocab, n_layers, layer, out_scale, dtype, *, rngs):
    del rngs
    Probe.seen.append(dict(d_model=d_model, vocab=vocab, n_layers=n_layers, layer=layer, out_scale=out_scale,
                           dtype=dtype))

  def __call__(self, x, ctx):
    return jnp.zeros_like(x)

  def cost(self, seq_len):
    return accounting.Cost()


def test_every_branch_gets_the_facts_it_names():
  """pre / augment / channel / sequence factories all receive the facts, out_scale included (pre and
  augment branches got none before), each with its own layer index."""
  Probe.seen = []
  cfg = experiment()
  cfg.model.overrides = (fdl.Config(LayerOverride, layers=(1, 3), pre=(Probe,), augment=(Probe,)),)
  cfg.model.n_layers = 4
  Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0))
  want = [dict(d_model=64, vocab=256, n_layers=4, layer=i, out_scale=8 ** -0.5, dtype="float32")
          for i in (1, 1, 3, 3)]
  assert Probe.seen == want
  assert facts(fdl.build(cfg.model))["d_ff"] == 128  # the default for factories that leave d_ff unset


def test_a_bound_fact_that_disagrees_is_refused_naming_both():
  cfg = cli.build_config(["config:stem_tiny", "set:model.vocab=512"])
  cfg.model.overrides[0].channel_mixer.vocab = 256  # a stale copy, as fiddlers used to write
  with pytest.raises(ValueError) as e:
    nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))
  msg = str(e.value)
  assert "vocab=256" in msg and "vocab is 512" in msg and "\n" not in msg
  cfg.model.overrides[0].channel_mixer.vocab = 512  # agreeing is fine
  nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))


def test_move_bank_width_disagreeing_with_attention_is_refused():
  cfg = cli.build_config(["config:move_tiny", "set:model.sequence_mixer.n_slots=3"])
  model = Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0))
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="shared bank rows of n_slots·n_kv_heads·head_dim = 96 but the MoveBank"):
    jax.eval_shape(functools.partial(model.__call__, ctx=TokenContext(ids, ids, ids + 1)), ids)


@pytest.mark.parametrize("commands,message", [
    (("config:engram_tiny", "set:model.n_layers=1"), "an override names layer 1 but model.n_layers=1"),
    (("config:stem_tiny", "fiddler:stem_layers(schedule=(1, 9))"), "STEM layers (1, 9) outside 0..3"),
])
def test_parts_that_disagree_fail_before_anything_is_written(tmp_path, commands, message):
  work = tmp_path / "w"
  r = run_launcher(*(a for c in commands for a in ("--config", c)), "--workdir", str(work))
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert message in last, r.stderr[-2000:]
  assert not work.exists()
