"""Editing and injection through token-indexed memory rows (pmem.memory.edit): the edit modes,
context edits equal to the equivalent row writes, average mode against NumPy, injection into
stacked tables, and the bios editing demo's metrics on a tiny run."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.memory import edit
from pmem.memory.move import LaveAttention
from pmem.memory.stem import STEM
from pmem.models import Decoder, DecoderConfig, LayerOverride
from tests.test_stem_move import ATOL, B, D, F, N_HEADS, N_KV, RTOL, T, V, apply, context, f64, randomized, stem_np


def test_retarget_modes():
  ids = np.array([1, 2, 3, 4, 5])
  m, w = edit.retarget(ids, (1, 3), np.array([8, 9]), "one_to_one")
  np.testing.assert_array_equal(m[:, 0], [1, 8, 9, 4, 5])
  np.testing.assert_array_equal(w, np.ones((5, 1)))
  m, w = edit.retarget(ids, (1, 4), np.array([8, 9]), "copy")
  np.testing.assert_array_equal(m[:, 0], [1, 8, 9, 8, 5])
  m, w = edit.retarget(ids, (1, 4), np.array([8, 9]), "pad", pad_id=0)
  np.testing.assert_array_equal(m[:, 0], [1, 8, 9, 0, 5])
  m, w = edit.retarget(ids, (1, 4), np.array([8, 9]), "auto")  # lengths differ: average
  np.testing.assert_array_equal(m[1:4], [[8, 9]] * 3)
  np.testing.assert_array_equal(w[1:4], 0.5)  # 1 / 2: exact
  np.testing.assert_array_equal(w[[0, 4]], [[1, 0], [1, 0]])
  with pytest.raises(ValueError, match="equal lengths"):
    edit.retarget(ids, (1, 4), np.array([8, 9]), "one_to_one")
  with pytest.raises(ValueError, match="unknown edit mode"):
    edit.retarget(ids, (1, 4), np.array([8]), "swap")
  with pytest.raises(ValueError, match="one memory id per position"):
    edit.single_ids(edit.edit_features(ids[None], [((1, 4), np.array([8, 9]))], "average"))


def test_context_edit_reads_the_target_rows():
  """STEM under a context edit equals (one_to_one) the module whose source rows were overwritten by
  the target rows and (average) a float64 NumPy STEM over averaged rows; unedited positions keep
  their own rows."""
  rng = np.random.default_rng(0)
  m = randomized(lambda: STEM(D, d_ff=F, vocab=V, rngs=nnx.Rngs(1)), 1)
  ids = np.array([[3, 5, 7, 2, 9, 4, 11], [1, 2, 4, 6, 3, 8, 10]])  # 5 and 7 occur only in row 0, at 1..2
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  feats = edit.edit_features(ids, [((1, 3), np.array([12, 13])), None], "one_to_one")
  y_edit = np.asarray(apply(m, x, context(ids, feats)))
  written = edit.write_rows(nnx.split(m)[1], ("table",), np.array([5, 7]), m.table[...][np.array([12, 13])])
  y_write = np.asarray(apply(nnx.merge(nnx.split(m)[0], written), x, context(ids)))
  # the same rows through the same matmul shapes; only the programs' elementwise fusion may differ:
  # a few roundings of O(1) values, 8·eps ≈ 1e-6 abs + rel
  np.testing.assert_allclose(y_edit, y_write, rtol=1e-6, atol=1e-6)
  assert not np.allclose(y_edit, np.asarray(apply(m, x, context(ids))))

  feats = edit.edit_features(ids, [((1, 3), np.array([12, 13, 14])), None], "average")
  table = f64(m.table)
  p = {"U": np.concatenate([table, table[[12, 13, 14]].mean(0, keepdims=True)]),  # row V: the averaged rows
       "Wg": f64(m.w_gate), "Wd": f64(m.w_down)}
  edited = ids.copy()
  edited[0, 1:3] = V
  ref = stem_np(np.asarray(x, np.float64), edited, p, "stem")
  np.testing.assert_allclose(np.asarray(apply(m, x, context(ids, feats))), ref, rtol=RTOL, atol=ATOL)  # STEM's bound


def test_inject_writes_every_token_table_and_layer():
  cfg = DecoderConfig(vocab=V, d_model=D, n_layers=2,
                      sequence_mixer=functools.partial(Attention, n_heads=N_HEADS, n_kv_heads=N_KV),
                      channel_mixer=functools.partial(SwiGLU, d_ff=F),
                      overrides=(LayerOverride(layers=(0, 1), channel_mixer=functools.partial(STEM, d_ff=F, vocab=V)),
                                 LayerOverride(layers=(1,), sequence_mixer=functools.partial(
                                     LaveAttention, n_heads=N_HEADS, n_kv_heads=N_KV, vocab=V))))
  dec = randomized(lambda: Decoder(cfg, rngs=nnx.Rngs(3)), 3)
  g, params = nnx.split(dec)
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(edit.inject(params, [4, 6], [9], "average"))}
  tables = [p for p in before if p[-1] == "table" and p[0] != "embed"]
  assert len(tables) == 3, tables  # STEM layer 0, STEM layer 1, LaVE layer 1
  for p, a in before.items():
    b = after[p]
    if p not in tables:
      np.testing.assert_array_equal(a, b)
      continue
    np.testing.assert_array_equal(b[..., [4, 6], :], np.repeat(a[..., [9], :], 2, axis=-2))
    keep = np.setdiff1d(np.arange(V), [4, 6])
    np.testing.assert_array_equal(b[..., keep, :], a[..., keep, :])


@pytest.mark.slow
def test_bios_edit_demo_runs(tmp_path):
  from experiments.edit import main
  report = main(["--workdir", str(tmp_path), "--steps", "30", "--people", "20", "--edits", "4", "--quick"])
  assert json.loads((tmp_path / "edit.json").read_text()) == report
  assert report["pairs"] == 4 and report["probes"] > 0 and report["locality_probes"] > 0
  # no edit, and a context edit (which touches only the edited prompts), leave the other people's
  # predictions as they were, token for token: the same program on the same inputs
  assert report["before"]["locality"] == report["context"]["locality"] == 1.0
  for kind in ("before", "context", "inject"):
    for metric in ("reliability", "generalization", "locality"):
      assert 0.0 <= report[kind][metric] <= 1.0
  # greedy answers to A's questions, before and after the injection (a context edit cannot be generated)
  assert "generated_reliability" not in report["context"]
  assert all(0.0 <= report[k]["generated_reliability"] <= 1.0 for k in ("before", "inject"))
  from pmem.data.tasks.bios import Bios, BiosConfig
  a_names = [p.name for p in Bios(BiosConfig(n_people=20)).people[:4:2]]  # A of the first two pairs
  assert report["samples"]
  for s in report["samples"]:
    assert any(n in s["question"] for n in a_names) and all(isinstance(s[k], str) for k in ("before", "inject"))


def test_engram_hashes_the_edited_stream():
  """Under a context edit Engram's host features are those of the edited ids (one id per position)."""
  from pmem.data.tokenizer import ByteTokenizer
  from pmem.memory.engram import Engram
  m = nnx.eval_shape(lambda: Engram(D, 1, (1,), 16, 101, heads=2, rngs=nnx.Rngs(0)))
  fn = m.host_features(ByteTokenizer())
  ids = np.array([[3, 5, 7, 2, 9, 4, 11]])
  pos = np.arange(7)[None]
  feats = edit.edit_features(ids, [((1, 3), np.array([12, 13]))], "one_to_one")
  edited = ids.copy()
  edited[0, 1:3] = [12, 13]
  got = fn({"inputs": ids, "positions": pos, **feats})
  want = fn({"inputs": edited, "positions": pos})
  np.testing.assert_array_equal(got[m.feature], want[m.feature])
  assert not np.array_equal(got[m.feature], fn({"inputs": ids, "positions": pos})[m.feature])
  with pytest.raises(ValueError, match="one memory id"):
    fn({"inputs": ids, "positions": pos, **edit.edit_features(ids, [((1, 3), np.array([12, 13, 14]))], "average")})
