"""Evaluation: answer scores match an independent forward pass, generated answers follow the
teacher-forced argmax chain, bits per byte, task reports in summary.json and TensorBoard, and
out-of-range ids rejected at the boundary."""

import json
import math

import fiddle as fdl
import jax
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.mixer import TokenContext
from pmem.data.tasks import EvalItem
from pmem.train.loop import Trainer
from tests.tolerances import tol

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
  model = nnx.merge(t.graphdef, t.train_state["params"], t.train_state["rest"])
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
    # one unpadded row vs the evaluator's padded batch (as test_model's packed documents): per layer
    # the attention's two sums over the T keys group their terms otherwise (each row's matmuls keep
    # their order), then the log-softmax's over the vocab; at the scale of n token nlls, ≲ log V each
    c, t1 = t.exp.model, t.exp.train.seq_len
    np.testing.assert_allclose(sc.nats, -logp[pos, tgt[pos]].sum(),
                               **tol(np.float32, n * math.log(c.vocab), c.n_layers * 2 * t1 + c.vocab))
    assert sc.correct == bool((logp[pos].argmax(-1) == tgt[pos]).all())


def test_generation_follows_the_teacher_forced_argmax_chain(bios):
  """On the untrained model, per probe: the greedy tokens, scored teacher-forced as the answer, are
  every one the argmax; and the evaluator's generated match equals teacher-forced correctness, on
  the real probes and on probes whose answers are the model's own continuations (1-3 tokens)."""
  t, tok = bios, bios.data.tokenizer
  items = [it for kind in ("seen", "heldout") for it in t.data.tasks["bios"].eval_items(kind, 3)]
  prompts = [np.asarray(x, np.int32) for x in tok.encode_batch([it.context for it in items])]
  new = t.generate(prompts, 3)  # 36 prompts of several lengths: batches of 8, the last filled up
  assert [len(g) for g in new] == [3] * len(items)
  docs = [(np.concatenate([p, g]), np.arange(len(p) + 3) >= len(p)) for p, g in zip(prompts, new)]
  assert all(hit.all() for _, hit in t.evaluator._spans(docs, "greedy chains"))
  own = []
  for i, (it, g) in enumerate(zip(items, new)):
    answer = tok.decode(g[:1 + i % 3])
    if answer.strip() and np.array_equal(tok.encode_batch([answer])[0], g[:1 + i % 3]):  # encodes back to them
      own.append(EvalItem(it.context, answer, it.group))
  assert len(own) >= 6
  probes = items + own
  correct = [sc.correct for sc in t.evaluator.answers(probes)]
  assert correct[len(items):] == [True] * len(own)
  assert t.evaluator.generated(probes) == correct


def test_bios_run_reports_accuracy_and_knowledge_bits(tmp_path):
  t = trainer("bios_small", "set:data.bios.n_people=12", "set:data.tokenizer.vocab_size=320", "set:model.vocab=320",
              "set:train.steps=4", "set:eval.every=2", "set:eval.generate=True", "set:eval.bios_people=3")
  s = t.run()["eval"]
  assert t._generator[0] is t.train_state["params"]  # the generator was given the final parameters
  from pmem.data.tasks.bios import ATTRIBUTES
  # by hand from the final model's answer scores (the test above checks those against a forward pass),
  # the items in the evaluator's order: the same batches, so the same scores bit for bit
  bios = t.data.tasks["bios"]
  items = [it for kind in ("seen", "heldout") for it in bios.eval_items(kind, t.evaluator.cfg.bios_people)]
  scores = t.evaluator.answers(items)

  def acc(keep):
    hits = [sc.correct for it, sc in zip(items, scores) if keep(dict(it.group))]
    return sum(hits) / len(hits)

  for kind in ("seen", "heldout"):
    assert s[f"bios/acc/{kind}"] == acc(lambda g: g["templates"] == kind)
    for a in ATTRIBUTES:
      assert s[f"bios/acc/{a}/{kind}"] == acc(lambda g: g["templates"] == kind and g["attribute"] == a), (a, kind)
  bits = 0.0  # Σ over seen items of max(0, log2 |D_a| − nats / ln 2), attributes with log2 |D_a| > 0
  for it, sc in zip(items, scores):
    g = dict(it.group)
    if g["templates"] == "seen" and bios.domain_bits[g["attribute"]] > 0:
      bits += max(0.0, bios.domain_bits[g["attribute"]] - sc.nats / math.log(2))
  # float64 sums of ≤ len(items) terms, per attribute and then over them: another order
  np.testing.assert_allclose(s["bios/knowledge_bits"], bits, **tol(np.float64, bits, terms=len(items)))
  want = bios.report(items, scores, t.evaluator.generated(items))  # every entry is that of these answers
  assert {f"bios/generated_acc/{kind}" for kind in ("seen", "heldout")} <= set(want)
  assert {k: s[k] for k in want} == want
  assert s["bios/bits_per_param"] == s["bios/knowledge_bits"] / t.params_total
  assert s["bios/bits_per_active_param"] == s["bios/knowledge_bits"] / t.cost.active_params


@pytest.mark.slow
@pytest.mark.parametrize("name,sets,key", [
    ("mqar_small", ["set:data.mqar.n_train=64", "set:data.mqar.n_test=16"], "mqar/acc"),
    ("passkey_small", ["set:data.passkey.n_train=32", "set:data.passkey.n_eval=1", "set:eval.generate=True"],
     "passkey/acc/length/24/depth/0.5"),
])
def test_task_configs_train_and_report(name, sets, key):
  t = trainer(name, "set:train.steps=2", *sets)
  s = t.run()["eval"]
  if name == "mqar_small":  # correct answer tokens over the 16 test examples' 4 answers each
    m = t.data.tasks["mqar"]
    ex = [m.example("test", i) for i in range(16)]
    hits = [h for _, h in t.evaluator._spans([(x["tokens"], x["mask"]) for x in ex], "mqar")]
    assert [len(h) for h in hits] == [m.cfg.num_kv_pairs] * 16
    assert s[key] == sum(int(h.sum()) for h in hits) / (16 * m.cfg.num_kv_pairs)
  else:  # one probe per (length, depth) (n_eval=1): a cell's accuracy is its probe's exact match
    items = t.data.tasks["passkey"].eval_items()  # in the evaluator's order: the same batches and scores
    scores = t.evaluator.answers(items)
    (hit,) = [sc.correct for it, sc in zip(items, scores) if it.group == (("length", 24), ("depth", 0.5))]
    assert s[key] == float(hit) and s["passkey/acc"] == sum(sc.correct for sc in scores) / len(scores)
    generated = t.evaluator.generated(items)
    assert s["passkey/generated_acc"] == sum(generated) / len(items)
    assert all(g for g, sc in zip(generated, scores) if sc.correct)  # teacher-forced correct: generated too


def test_probes_beyond_the_trained_length_are_scored_in_longer_rows():
  """MQAR and passkey at eval lengths 2x / 4x the trained one: rows as long as the probe, the same scores as a
  model trained with that seq_len would give the same probes (the same initial weights: neither trains)."""
  sets = ["set:train.steps=1", "set:data.mqar.n_train=16", "set:data.mqar.n_test=8", "set:model.vocab=512",
          "set:data.mqar.seq_len=32", "set:train.seq_len=32", "set:train.batch_size=4"]
  t = trainer("mqar_small", *sets, "set:data.mqar.eval_lengths=(64, 128)")
  s = t.evaluate()
  assert {"mqar/acc", "mqar/acc/length/64", "mqar/acc/length/128"} <= set(s)
  m = t.data.tasks["mqar"]
  ex = [m.example("test", i, 128) for i in range(8)]
  hits = [h for _, h in t.evaluator._spans([(x["tokens"], x["mask"]) for x in ex], "mqar", True)]
  assert s["mqar/acc/length/128"] == sum(int(h.sum()) for h in hits) / (8 * m.cfg.num_kv_pairs)
  wide = trainer("mqar_small", *sets[:-2], "set:train.seq_len=128", "set:train.batch_size=4")
  ref = [h for _, h in wide.evaluator._spans([(x["tokens"], x["mask"]) for x in ex], "mqar")]
  assert all(np.array_equal(a, b) for a, b in zip(hits, ref))
  with pytest.raises(ValueError, match="raise train.seq_len"):  # probes at the trained length still must fit
    list(t.evaluator._spans([(x["tokens"], x["mask"]) for x in ex], "mqar"))


def test_text_eval_bits_per_byte_and_tensorboard(tmp_path):
  t = Trainer(fdl.build(cli.build_config(["config:tiny", "set:train.steps=2", "set:train.progress=False",
                                          "set:eval.valid_batches=2"])), workdir=str(tmp_path))
  s = t.run()
  ev = s["eval"]
  # byte tokenizer, 1 byte per token: the same float64 quotients in another order (approx: rel 1e-6)
  assert ev["valid/bpb"] == pytest.approx(ev["valid/loss"] / math.log(2))
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
