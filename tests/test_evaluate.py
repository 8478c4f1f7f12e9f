"""Evaluation: answer scores match an independent forward pass, bits per byte, task reports in
summary.json and TensorBoard, and out-of-range ids rejected at the boundary."""

import json
import math

import fiddle as fdl
import jax
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.memory.base import TokenContext
from pmem.train.loop import Trainer

SMALL = ["set:model.d_model=32", "set:model.n_layers=2", "set:train.batch_size=8", "set:train.progress=False"]


def trainer(name, *sets) -> Trainer:
  return Trainer(fdl.build(cli.build_config([f"config:{name}", *SMALL, *sets])))


@pytest.fixture(scope="module")
def bios():
  return trainer("bios_small", "set:data.bios.n_people=12", "set:data.tokenizer.vocab_size=320",
                 "set:model.vocab=320", "set:train.steps=4")


def test_answer_scores_match_an_independent_forward_pass(bios):
  t = bios
  items = t.data.tasks["bios"].eval_items("heldout", 3)
  scores = t.evaluator.answers(items)
  model = nnx.merge(t.graphdef, t.state["params"], t.state["rest"])
  tok = t.data.tokenizer
  for it, sc in zip(items, scores):
    ids = tok.encode_batch([it.context + it.answer])[0]  # joint encoding: the probe split must agree
    n = len(tok.encode_batch([it.answer])[0])
    x = ids[None, :-1]
    ctx = TokenContext(x, np.arange(x.shape[1])[None], np.ones_like(x))
    logp = np.asarray(jax.nn.log_softmax(model(x, ctx).astype(np.float32), axis=-1))[0]
    tgt = ids[1:]
    pos = np.arange(len(tgt) - n, len(tgt))
    assert sc.tokens == n
    np.testing.assert_allclose(sc.nats, -logp[pos, tgt[pos]].sum(), rtol=2e-5)
    assert sc.correct == bool((logp[pos].argmax(-1) == tgt[pos]).all())


def test_bios_run_reports_accuracy_and_knowledge_bits(tmp_path):
  t = trainer("bios_small", "set:data.bios.n_people=12", "set:data.tokenizer.vocab_size=320", "set:model.vocab=320",
              "set:train.steps=4", "set:eval.every=2")
  s = t.run()["eval"]
  from pmem.data.tasks.bios import ATTRIBUTES
  for a in ATTRIBUTES:
    assert 0.0 <= s[f"bios/acc/{a}/seen"] <= 1.0 and f"bios/acc/{a}/heldout" in s
  assert s["bios/knowledge_bits"] >= 0.0
  assert s["bios/bits_per_param"] == pytest.approx(s["bios/knowledge_bits"] / t.params_total)
  assert s["bios/bits_per_active_param"] == pytest.approx(s["bios/knowledge_bits"] / t.cost.active_params)


@pytest.mark.slow
@pytest.mark.parametrize("name,sets,key", [
    ("mqar_small", ["set:data.mqar.n_train=64", "set:data.mqar.n_test=16"], "mqar/acc"),
    ("passkey_small", ["set:data.passkey.n_train=32", "set:data.passkey.n_eval=1"], "passkey/acc/length/24/depth/0.5"),
])
def test_task_configs_train_and_report(name, sets, key):
  s = trainer(name, "set:train.steps=2", *sets).run()["eval"]
  assert 0.0 <= s[key] <= 1.0


def test_text_eval_bits_per_byte_and_tensorboard(tmp_path):
  t = Trainer(fdl.build(cli.build_config(["config:tiny", "set:train.steps=2", "set:train.progress=False",
                                          "set:eval.valid_batches=2"])), workdir=str(tmp_path))
  s = t.run()
  ev = s["eval"]
  assert ev["valid/bpb"] == pytest.approx(ev["valid/loss"] / math.log(2))  # byte tokenizer: 1 byte per token
  assert ev["valid/ppl"] == pytest.approx(math.exp(ev["valid/loss"]))
  assert ev["valid/tokens"] == pytest.approx(2 * 16 * 64, rel=0.05)  # 2 batches, minus document boundaries
  assert json.load(open(tmp_path / "summary.json"))["eval"] == ev
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  assert {"train/loss", "train/tokens_per_s", "train/data_fraction", "valid/bpb"} <= set(tags)
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_out_of_range_ids_are_rejected_at_the_boundary():
  with pytest.raises(ValueError, match=r"data has ids up to 255 .* model.vocab=100"):
    Trainer(fdl.build(cli.build_config(["config:tiny", "set:model.vocab=100"])))
  t = Trainer(fdl.build(cli.build_config(["config:tiny", "set:train.progress=False"])))
  b = t.data.rows(0, t.rows)
  b["inputs"][0, 3] = 256
  with pytest.raises(ValueError, match=r"token ids in \[\d+, 256\], outside \[0, model.vocab=256\)"):
    t.to_device(b, t.rows)
