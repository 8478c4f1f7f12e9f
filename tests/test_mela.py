"""Mela's Hierarchical Memory Module (pmem/memory/mela.py) and MemStack (configs/mela.py): with the mix forced to
one level the HMM is that level's NeuralMemory bit for bit, and ``levels=1`` is a plain NeuralMemory; the mix
weights lie in (0, 1) and follow the input; the mixer against an independent float64 NumPy transcription (the mix
of two NumPy LMMs: projections, short convs, gates, tests/test_titans.py's transcription of the memory update,
head norm, output gate and projection); the state holds both levels and does not grow with ``max_len``; bad sizes
are refused; the MemStack schedule; the one-frequency ablation trains. Prefill + decode == the full forward: the
registry's tests (``-k mela`` in tests/test_decode.py, test_recurrence.py, test_facts.py)."""

import json
import math

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.memory.mela import HierarchicalMemory
from pmem.memory.titans import NeuralMemory
from pmem.models import Decoder
from pmem.train.loop import Trainer
from tests.test_titans import transcription
from tests.mixer_inputs import ctx, perturb
from tests.tolerances import assert_close

B, T, D, H, K, C, R = 2, 13, 8, 2, 4, 2, 3  # rows, tokens, width, heads (head_dim 4), fast chunk, slow = C·R = 6


def layout():
  """positions / segment_ids [B, T]: row 0 two packed documents (the second from 7), row 1 three tokens of left
  padding; both levels cross chunk boundaries."""
  pos, seg = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int64)
  pos[0, 7:], seg[0, 7:] = np.arange(T - 7), 2
  pos[1, :3], seg[1, :3], pos[1, 3:] = 0, 0, np.arange(T - 3)
  return pos, seg


def perturbed(m, seed: int = 1):
  """``m`` with every parameter moved off its init (gates, convs, the mix), and an input ``[B, T, D]``."""
  return perturb(m, 0.2, seed), np.asarray(jax.random.normal(jax.random.key(2), (B, T, D)))


def jitted(m):
  return jax.jit(lambda s, *a: nnx.merge(nnx.graphdef(m), s)(*a))


def test_mix_forced_to_one_level_is_that_neural_memory_bit_for_bit():
  """``b_mix = +∞`` (g = 1): the fast NeuralMemory (chunk C); ``−∞`` (g = 0): the slow one (chunk C·R); outputs of a
  whole call, of a prefill and of the call continuing it, and the states, bit for bit."""
  m, x = perturbed(HierarchicalMemory(D, H, chunk=C, ratio=R, rngs=nnx.Rngs(0)))
  pos, seg = layout()
  run_m = jitted(m)
  for name, bias, chunk in (("fast", np.inf, C), ("slow", -np.inf, C * R)):
    m.b_mix[...] = jnp.full((D,), bias)
    level = NeuralMemory(D, H, chunk=chunk, rngs=nnx.Rngs(5))
    nnx.update(level, nnx.state(getattr(m, name)))
    run_l = jitted(level)
    np.testing.assert_array_equal(run_m(nnx.state(m), x, ctx(pos, seg)), run_l(nnx.state(level), x, ctx(pos, seg)))
    sm, sl = m.init_state(B, 64), level.init_state(B, 64)
    for a, b in ((0, 6), (6, 12)):  # a prefill ending inside a chunk of either level, then a call continuing it
      (ym, sm), (yl, sl) = run_m(nnx.state(m), x[:, a:b], ctx(pos[:, a:b], seg[:, a:b]), sm), run_l(
          nnx.state(level), x[:, a:b], ctx(pos[:, a:b], seg[:, a:b]), sl)
      np.testing.assert_array_equal(ym, yl)
      jax.tree.map(np.testing.assert_array_equal, sm[name], sl)


def test_one_level_is_a_plain_neural_memory():
  m, x = perturbed(HierarchicalMemory(D, H, levels=1, chunk=C, rngs=nnx.Rngs(0)))
  level = NeuralMemory(D, H, chunk=C, rngs=nnx.Rngs(5))
  nnx.update(level, nnx.state(m.fast))
  assert set(nnx.to_pure_dict(nnx.state(m, nnx.Param))) == {"fast"}  # no slow level, no mix
  c = ctx(*layout())
  np.testing.assert_array_equal(jitted(m)(nnx.state(m), x, c), jitted(level)(nnx.state(level), x, c))


def test_mix_weights_lie_in_the_unit_interval_and_follow_the_input():
  """g = σ(x W_mix + b_mix): strictly inside (0, 1), different per token and channel; a token's input moves its
  own weights and no other token's."""
  m, x = perturbed(HierarchicalMemory(D, H, chunk=C, ratio=R, rngs=nnx.Rngs(0)))
  g = np.asarray(m.mix(jnp.asarray(x, jnp.float32)))
  assert g.shape == (B, T, D) and (g > 0).all() and (g < 1).all()
  assert g.std(1).min() > 0.05 and g.std(2).min() > 0.05
  x2 = x.copy()
  x2[:, 4] = -x2[:, 4]
  g2 = np.asarray(m.mix(jnp.asarray(x2, jnp.float32)))
  assert np.abs(g2[:, 4] - g[:, 4]).min(-1).max() > 1e-3
  np.testing.assert_array_equal(np.delete(g2, 4, 1), np.delete(g, 4, 1))


def sigmoid(u):
  return 1 / (1 + np.exp(-u))


def lmm(w, x, pos, seg, chunk):
  """NeuralMemory's ``__call__`` in float64 NumPy from its parameters ``w`` (titans.py's docstring): q, k, v after
  the causal short conv (no tap across a document start) + SiLU, q and k L2-normalised; θ, η, α = σ(x W + b); the
  memory update (tests/test_titans.py's transcription, gradients clipped to norm 1); per-head RMSNorm, SiLU output
  gate, output projection."""
  b, t, _ = x.shape
  silu = lambda u: u * sigmoid(u)  # noqa: E731
  lag = lambda u, j: np.pad(u, ((0, 0), (j, 0), (0, 0)))[:, :t]  # noqa: E731  u_{t−j}
  conv = lambda u, n: silu(sum(np.where((pos >= j)[..., None], lag(u, j), 0.0) * w["convs"][n]["w"][j]  # noqa: E731
                               for j in range(len(w["convs"][n]["w"]))))
  q, k, v = (conv(x @ w[f"w{n}"], n).reshape(b, t, H, K) for n in "qkv")
  q, k = (u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6) for u in (q, k))
  theta, eta, alpha = sigmoid(x @ w["w_gates"] + w["b_gates"]).reshape(b, t, 3, H).transpose(2, 0, 1, 3)
  W0 = [w["W0"][i] for i in sorted(w["W0"])]
  o = transcription(W0, q, k, v, theta, eta, alpha, pos, seg, chunk, max_norm=1.0)
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * w["norm"]
  o = o * silu(x @ w["wg"]).reshape(b, t, H, K)
  return o.reshape(b, t, H * K) @ w["wo"]


def reference(m, x, pos, seg):
  """The HMM in float64 NumPy: ``g ⊙ y_fast + (1 − g) ⊙ y_slow``, ``g = σ(x W_mix + b_mix)``."""
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  g = sigmoid(x @ w["w_mix"] + w["b_mix"])
  return g * lmm(w["fast"], x, pos, seg, C) + (1 - g) * lmm(w["slow"], x, pos, seg, C * R)


# float64 roundings on the way: the projections' D-products, the conv's 4 taps and the L2 norm's K; per token the
# memory's inner gradient and read through the MLP (K- and 2K-products, 4 layers of them) and the momentum and
# weight sums over up to T tokens; the RMSNorm's K, the out-projection's H·K, the mix's D-product; 16 for the
# elementwise ops and transcendental functions
TERMS = D + 4 + K + 4 * 2 * K + 2 * T + K + H * K + D + 16


def test_matches_the_float64_transcription():
  m, x = perturbed(HierarchicalMemory(D, H, chunk=C, ratio=R, rngs=nnx.Rngs(0)))
  pos, seg = layout()
  real = seg > 0
  with jax.enable_x64(True):
    m64 = HierarchicalMemory(D, H, chunk=C, ratio=R, dtype="float64", rngs=nnx.Rngs(0))
    nnx.update(m64, jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), nnx.state(m, nnx.Param)))
    want = reference(m64, x, pos, seg)
    y = np.asarray(m64(jnp.asarray(x), ctx(pos, seg)))
    ys, state = m64(jnp.asarray(x), ctx(pos, seg), m64.init_state(B, 64, "float64"))
  g = sigmoid(x @ np.asarray(m64.w_mix[...]) + np.asarray(m64.b_mix[...]))
  assert 0.05 < g[real].mean() < 0.95 and g[real].std() > 0.1  # both levels weigh in, token by token
  print(f"max |y - numpy| = {np.abs(y[real] - want[real]).max():.2e} (max |y| {np.abs(want[real]).max():.2f})")
  assert y.dtype == np.float64 and all(np.asarray(a).dtype == np.float64 for a in jax.tree.leaves(state))
  assert_close(y[real], want[real], dtype=np.float64, terms=TERMS)
  assert_close(np.asarray(ys)[real], want[real], dtype=np.float64, terms=TERMS)


def test_the_state_holds_both_levels_and_does_not_grow_with_max_len():
  m = HierarchicalMemory(D, H, chunk=C, ratio=R, rngs=nnx.Rngs(0))
  shapes = lambda n: jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: m.init_state(B, n)))  # noqa: E731
  assert set(m.init_state(B, 64)) == {"fast", "slow"} and shapes(64) == shapes(4096)
  assert shapes(64)["slow"] == jax.tree.map(lambda a: a.shape, m.slow.init_state(B, 64))


@pytest.mark.parametrize("kw, match", [({"levels": 3}, "levels must be 1"), ({"ratio": 1}, "ratio"),
                                       ({"chunk": 0}, "chunk must be >= 1")])
def test_bad_sizes_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    HierarchicalMemory(D, H, **kw, rngs=nnx.Rngs(0))


def model_of(*commands) -> Decoder:
  cfg = cli.build_config([*commands, "set:model.scan_layers=False"])
  return nnx.eval_shape(lambda: Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0)))


def levels(model):
  """Per layer: the chunk of each memory level of its sequence mixer."""
  seqs = [b.seq for s in model.stages for b in s.blocks]
  return [{n: x.chunk for n, x in s.mems().items()} if isinstance(s, HierarchicalMemory) else s.chunk for s in seqs]


def test_memstack_schedule():
  """mela_tiny: layer 0 the slow level alone, layer 1 the fast one, the later layers the HMM (also over 6 layers);
  the ablation: one level of the fast chunk everywhere."""
  hmm = {"fast": 4, "slow": 32}
  assert levels(model_of("config:mela_tiny")) == [32, 4, hmm, hmm]
  assert levels(model_of("config:mela_tiny", "set:model.n_layers=6")) == [32, 4, *[hmm] * 4]
  assert levels(model_of("config:mela_one_tiny")) == [{"fast": 4}] * 4


def test_the_one_frequency_ablation_trains_a_step(tmp_path):
  cfg = cli.build_config(["config:mela_one_tiny", "set:model.n_layers=1", "set:train.steps=1", "set:train.batch_size=2",
                          "set:train.seq_len=16", "set:train.progress=False", "set:eval.valid_batches=0"])
  Trainer(fdl.build(cfg), str(tmp_path)).run()
  (row,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
  assert math.isfinite(row["loss"]) and row["loss"] > 0
