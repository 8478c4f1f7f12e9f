"""Decoder structure: segment masking, scan == loop, remat == none, accounting, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmem.core import accounting
from pmem.core.variables import MemoryTable
from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.core.mixer import TokenContext
from pmem.models import Decoder, DecoderConfig, LayerOverride
from pmem.models.decoder import blocks
from pmem.train import optim
from tests.tolerances import assert_close


def config(**kw) -> DecoderConfig:
  base = dict(vocab=64, d_model=32, n_layers=4,
              sequence_mixer=functools.partial(Attention, n_heads=4, n_kv_heads=2),
              channel_mixer=functools.partial(SwiGLU, d_ff=48))
  return DecoderConfig(**{**base, **kw})


def context(ids, segment_ids=None, positions=None):
  b, t = ids.shape
  seg = jnp.ones_like(ids) if segment_ids is None else segment_ids
  pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
  return TokenContext(ids, pos, seg)


def forward(model, ids, ctx):
  """Jitted forward (eager NNX dispatch is slow on CPU)."""
  g, st = nnx.split(model)
  return jax.jit(lambda st, ids, ctx: nnx.merge(g, st)(ids, ctx))(st, ids, ctx)


def test_output_shape_and_dtype():
  m = Decoder(config(), rngs=nnx.Rngs(0))
  ids = jnp.zeros((3, 10), jnp.int32)
  y = forward(m, ids, context(ids))
  chex.assert_shape(y, (3, 10, 64))
  chex.assert_type(y, jnp.float32)
  chex.assert_tree_all_finite(y)


def test_packed_documents_do_not_attend_across():
  m = Decoder(config(), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (1, 24)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 14])
  pos = jnp.asarray([list(range(10)) + list(range(14))])
  y = forward(m, ids, context(ids, seg, pos))
  ids2 = ids.at[0, :10].set(jnp.asarray(rng.integers(0, 64, 10)))  # change document 1 only
  y2 = forward(m, ids2, context(ids2, seg, pos))
  np.testing.assert_array_equal(np.asarray(y[0, 10:]), np.asarray(y2[0, 10:]))  # one program: masked keys add 0
  assert np.abs(np.asarray(y[0, :10] - y2[0, :10])).max() > 1e-3
  # document 2 alone, at positions 0.., gives the same logits as when packed
  alone = forward(m, ids[:, 10:], context(ids[:, 10:]))
  # 14 vs 24 positions: the attention's two sums over the keys (masked ones add exact zeros) group
  # their terms into other vector lanes; each row's matmuls keep their order: 4 layers x 2 x 24
  assert_close(alone[0], y[0, 10:], terms=4 * 2 * 24)


def test_scan_equals_loop_and_remat_equals_none():
  scanned = Decoder(config(), rngs=nnx.Rngs(2))
  looped = Decoder(config(scan_layers=False), rngs=nnx.Rngs(5))
  for dst, src in zip(blocks(looped), blocks(scanned)):
    nnx.update(dst, nnx.state(src))
  nnx.update(looped.embed, nnx.state(scanned.embed))
  nnx.update(looped.norm_out, nnx.state(scanned.norm_out))
  looped.head[...] = scanned.head[...]
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  # the same operations and shapes, fused differently (scan body vs unrolled): a few roundings per op,
  # through 4 layers of ~8 ops
  assert_close(forward(scanned, ids, context(ids)), forward(looped, ids, context(ids)), terms=4 * 8)
  unrolled = Decoder(config(scan_unroll=3), rngs=nnx.Rngs(2))  # the same stacked parameters, 2 loop iterations
  assert_close(forward(unrolled, ids, context(ids)), forward(scanned, ids, context(ids)), terms=4 * 8)
  with pytest.raises(ValueError, match="scan_unroll must be >= 1"):
    Decoder(config(scan_unroll=0), rngs=nnx.Rngs(2))

  def grads(model):
    g, p = nnx.split(model)
    f = lambda p: nnx.merge(g, p)(ids, context(ids)).sum()
    return jax.jit(jax.grad(f))(p)
  remat = Decoder(config(remat="full"), rngs=nnx.Rngs(2))
  # the same operations (remat recomputes the forward), fused differently: a few roundings per op
  # forward and back through 4 layers (~4·8·2 terms) at the largest gradient, ~1e2: atol 1e-3 (rtol 1e-4
  # is looser than 64·eps; kept)
  chex.assert_trees_all_close(grads(scanned), grads(remat), rtol=1e-4, atol=1e-3)


def test_overrides_split_stages_and_cost_counts_params():
  half = functools.partial(SwiGLU, d_ff=16)
  m = Decoder(config(overrides=(LayerOverride(layers=(1, 3), channel_mixer=half),), tie_embeddings=True),
              rngs=nnx.Rngs(0))
  assert [(s.period, s.n) for s in m.stages] == [(2, 2)]  # one stage scanning 2 periods of (48, 16)
  assert [b.ch.d_ff for b in blocks(m)] == [48, 16, 48, 16]
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  c = m.cost(seq_len=10)
  assert c.params == n
  d, v, h = 32, 64, 32  # model width, vocab, n_heads*head_dim
  attn = 2 * (d * h + 2 * d * 16 + h * d) + 2 * 2 * 10 * h // 2
  ffn = lambda f: 2 * 3 * d * f
  assert c.flops == 4 * attn + 2 * ffn(48) + 2 * ffn(16) + 2 * d * v
  # active params: one embedding row instead of the table, everything else read in full
  assert c.active_params == n - v * d + d + v * d
  assert accounting.train_flops(c) == 3 * c.flops


def test_stacked_layers_are_one_stage():
  m = Decoder(config(), rngs=nnx.Rngs(0))
  assert len(m.stages) == 1 and m.stages[0].scan
  assert m.stages[0].blocks.seq.wq.shape == (4, 32, 4, 8)


def test_out_of_range_ids_are_rejected():
  m = Decoder(config(), rngs=nnx.Rngs(0))
  ids = jnp.asarray([[1, 64]], jnp.int32)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
    m(ids, context(ids))


def test_bad_layer_override_and_names_are_errors():
  with pytest.raises(ValueError, match="layer 9"):
    Decoder(config(overrides=(LayerOverride(layers=(9,)),)), rngs=nnx.Rngs(0))
  with pytest.raises(KeyError, match="did you mean 'swiglu'"):
    Decoder(config(channel_mixer="swiglue"), rngs=nnx.Rngs(0))
  with pytest.raises(KeyError, match="remat policy"):
    Decoder(config(remat="ful"), rngs=nnx.Rngs(0))


def test_memory_tables_are_selected_by_type_not_name():
  """A MemoryTable is a trained Param that filters and the optimizer's routing pick by its type: a
  Param named "table" stays dense, a MemoryTable named "w" goes to the table optimizer."""
  class M(nnx.Module):
    def __init__(self):
      self.table = nnx.Param(jnp.zeros((4, 2)))
      self.w = MemoryTable(jnp.zeros((8, 2)), axes=("table_rows", "embed"))

  m = M()
  assert [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))] == [("table",), ("w",)]  # both trained
  assert [p for p, _ in nnx.to_flat_state(nnx.state(m, MemoryTable))] == [("w",)]
  labels = optim.labels(nnx.state(m, nnx.Param))
  assert labels["table"] == "dense" and labels["w"] == "table"


def test_mismatched_context_shapes_are_rejected():
  m = Decoder(config(), rngs=nnx.Rngs(0))
  ids = jnp.zeros((2, 8), jnp.int32)
  bad = TokenContext(ids, jnp.zeros((2, 7), jnp.int32), jnp.ones_like(ids))
  with pytest.raises(AssertionError, match="shape"):
    forward(m, ids, bad)
