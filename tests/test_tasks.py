"""Synthetic tasks: bioS biographies, MQAR, passkey — determinism, domains, held-out templates, report math
(teacher-forced and generated answers)."""

import math
import re

import numpy as np
import pytest

from pmem.data.tasks import AnswerScore, EvalItem, matches
from pmem.data.tasks import bios as B
from pmem.data.tasks.mqar import Mqar, MqarConfig
from pmem.data.tasks.passkey import FILLER, Passkey, PasskeyConfig


@pytest.fixture(scope="module")
def people():
  return B.Bios(B.BiosConfig(n_people=300))


def sentences(doc):
  (text, in_loss), = doc
  assert in_loss and text.endswith(".")
  return [s + "." for s in text[:-1].split(". ")]


def test_bios_is_deterministic_by_seed(people):
  again, other = B.Bios(B.BiosConfig(n_people=300)), B.Bios(B.BiosConfig(n_people=300, seed=1))
  assert again.people == people.people and again.eval_items() == people.eval_items()
  assert again.document("train", 7, 3) == people.document("train", 7, 3)
  assert people.document("train", 7, 3) != people.document("train", 7, 4)
  assert other.people[0].name != people.people[0].name
  assert other.document("train", 7, 3) != people.document("train", 7, 3)


def test_domains_have_the_paper_sizes_and_unique_names():
  sizes = dict(first=400, middle=400, last=1000, city=200, university=300, major=100, employer=263)
  for name, size in sizes.items():
    assert len(B.DOMAINS[name]) == size == len(set(B.DOMAINS[name])), name
  words = B.FIRST_NAMES + B.MIDDLE_NAMES + B.LAST_NAMES + B.CITIES
  assert len(set(words)) == len(words) and all(re.fullmatch(r"[A-Z][a-z]+", w) for w in words)
  names = [p.name for p in B.Bios(B.BiosConfig(n_people=20000)).people]
  assert len(set(names)) == len(names)
  # float64 sums of 7 logs vs the log of the product: isclose's rel 1e-9 ≫ 7·eps64 ≈ 2e-15
  assert math.isclose(sum(B.DOMAIN_BITS.values()), math.log2(12 * 28 * 200 * 200 * 300 * 100 * 263))
  assert round(sum(B.DOMAIN_BITS.values()), 2) == 46.59 and B.DOMAIN_BITS["employer_city"] == 0


def test_employer_fixes_employer_city(people):
  assert all(p.employer_city == B.EMPLOYER_CITY[p.employer] for p in people.people)
  assert len({p.employer for p in people.people}) > 100 and len(set(B.EMPLOYER_CITY.values())) > 100


def test_prompts_are_unambiguous():
  prompts = [t.format(name="X") for ts in B.TEMPLATES.values() for t in ts]
  assert all(len(ts) >= 12 for ts in B.TEMPLATES.values())
  assert not [(a, b) for a in prompts for b in prompts if a != b and b.startswith(a + " ")]
  assert len(set(prompts)) == len(prompts)


def test_documents_use_only_seen_templates_and_cover_them(people):
  used = set()
  for i in range(0, 300, 3):
    p = people.people[i]
    for epoch in range(4):
      sents = sentences(people.document("train", i, epoch))
      assert len(sents) == len(B.ATTRIBUTES)
      assert all(s.startswith(p.name + " ") or s.startswith(p.name + "'s") for s in sents)
      for a in B.ATTRIBUTES:
        seen = [t for t in people.templates(a, "seen") if "".join(people.qa(i, a, t)) + "." in sents]
        assert len(seen) == 1, (a, sents)
        used.add(seen[0])
        text = " ".join(sents)
        assert not any(t.format(name=p.name) in text for t in people.templates(a, "heldout"))
  assert used == {t for a in B.ATTRIBUTES for t in people.templates(a, "seen")}


def test_eval_items_match_rendered_sentences(people):
  for kind in ("seen", "heldout"):
    items = people.eval_items(kind, people=20)
    assert len(items) == 20 * len(B.ATTRIBUTES) and items == people.eval_items(kind, people=20)
    for it in items:
      g = dict(it.group)
      assert g["templates"] == kind and it.answer.startswith(" ") and not it.answer.startswith("  ")
      assert not it.context[-1].isspace() and it.answer[1:] == getattr(people.people[it.key], g["attribute"])
      rendered = {"".join(people.qa(it.key, g["attribute"], t)) for t in people.templates(g["attribute"], kind)}
      assert it.context + it.answer in rendered
  seen = people.eval_items("seen", people=20)
  i = seen[0].key
  docs = [sentences(people.document("train", i, e)) for e in range(200)]
  assert any(seen[0].context + seen[0].answer + "." in d for d in docs)


def test_bios_report_accuracy_and_clamped_bits(people):
  items = people.eval_items("seen", people=2) + people.eval_items("heldout", people=1)
  nats = {"birth_date": 0.0, "birth_city": math.log(2), "university": 100.0, "major": 0.0, "employer": 0.0,
          "employer_city": 0.0}
  scores = [AnswerScore(nats=nats[dict(it.group)["attribute"]], correct=it.key == 0, tokens=3) for it in items]
  r = people.report(items, scores)
  assert r["bios/acc/seen"] == 0.5 and r["bios/acc/heldout"] == 1.0 and r["bios/acc/major/seen"] == 0.5
  assert not any("generated" in k for k in r)
  generated = [dict(it.group)["attribute"] == "major" for it in items]  # other hits than the teacher-forced
  g = people.report(items, scores, generated)
  assert {k: v for k, v in g.items() if "generated" not in k} == r
  assert g["bios/generated_acc/seen"] == g["bios/generated_acc/heldout"] == 1 / 6
  assert g["bios/generated_acc/major/seen"] == 1.0 and g["bios/generated_acc/employer/heldout"] == 0.0
  assert len(g) == len(r) + len([k for k in r if "/acc/" in k])  # every acc metric, generated too
  assert math.isclose(r["bios/bits/birth_city"], 2 * (math.log2(200) - 1))  # float64, a few terms: as above
  assert r["bios/bits/university"] == 0.0  # clamped at zero
  assert math.isclose(r["bios/bits/birth_date"], 2 * math.log2(12 * 28 * 200))
  total = 2 * (sum(B.DOMAIN_BITS.values()) - math.log2(300) - 1)
  assert math.isclose(r["bios/knowledge_bits"], total) and "bios/bits/employer_city" not in r


def test_mqar_layout():
  cfg = MqarConfig()
  m, half, kv = Mqar(cfg), cfg.vocab_size // 2, cfg.num_kv_pairs
  for i in range(200):
    ex = m.example("train", i)
    tok, mask = ex["tokens"], ex["mask"]
    assert tok.shape == mask.shape == (cfg.seq_len + 1,) and tok.dtype == np.int32
    assert tok.min() >= 0 and tok.max() < cfg.vocab_size
    keys, values = tok[0:2 * kv:2], tok[1:2 * kv:2]
    assert ((keys >= 1) & (keys < half)).all() and (values >= half).all() and len(set(keys)) == len(set(values)) == kv
    pos = np.flatnonzero(mask)
    assert len(pos) == kv and (pos >= 2 * kv + 1).all() and ((pos - 2 * kv) % 2 == 1).all()
    pairs = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(tok[pos - 1].tolist()) == sorted(keys.tolist())
    assert all(tok[j] == pairs[tok[j - 1]] for j in pos)
  zero = Mqar(MqarConfig(random_non_queries=False)).example("test", 3)
  rest = np.ones(cfg.seq_len + 1, bool)
  rest[:2 * kv] = False
  rest[np.flatnonzero(zero["mask"]) - 1] = rest[zero["mask"]] = False
  assert (zero["tokens"][rest] == 0).all()


def test_mqar_is_deterministic_with_disjoint_splits():
  m = Mqar(MqarConfig())
  a, b = m.example("train", 5), Mqar(MqarConfig()).example("train", 5)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], m.example("test", 5)["tokens"])
  assert not np.array_equal(a["tokens"], Mqar(MqarConfig(seed=1)).example("train", 5)["tokens"])
  assert m.num_examples("train") == 20000 and m.report(3, 4) == {"mqar/acc": 0.75}


def test_mqar_query_gaps_follow_the_power_law():
  one = Mqar(MqarConfig(num_kv_pairs=1))  # a single query: its gap is exactly one draw from p
  gaps = [(np.flatnonzero(one.example("train", i)["mask"])[0] - 3) // 2 for i in range(3000)]
  freq = np.bincount(gaps, minlength=len(one.gap_p)) / len(gaps)
  # 3000 draws: a frequency's standard error is ≤ √(0.25 / 3000) ≈ 0.009 (fixed seeds: the same draws anywhere)
  assert np.abs(freq - one.gap_p).max() < 0.03 and one.gap_p[0] > 5 * one.gap_p[-1]
  m = Mqar(MqarConfig())
  space = len(m.gap_p)
  g = np.concatenate([(np.flatnonzero(m.example("train", i)["mask"]) - 9) // 2 for i in range(500)])
  assert g.min() >= 0 and g.max() < space and g.mean() < 0.8 * (space - 1) / 2  # uniform would give (space-1)/2


def test_mqar_eval_lengths_draw_longer_test_sequences_of_the_same_task():
  cfg = MqarConfig(vocab_size=512, seq_len=64, eval_lengths=(128, 256))
  m, kv = Mqar(cfg), cfg.num_kv_pairs
  assert np.array_equal(m.example("test", 3)["tokens"], Mqar(MqarConfig()).example("test", 3)["tokens"])
  for t in (128, 256):
    ex = [m.example("test", i, t) for i in range(100)]
    assert all(x["tokens"].shape == x["mask"].shape == (t + 1,) and x["mask"].sum() == kv for x in ex)
    far = max(np.flatnonzero(x["mask"]).max() for x in ex)
    assert far > 64  # queries reach past the trained length
    assert not np.array_equal(ex[0]["tokens"][:65], m.example("test", 0)["tokens"])  # its own rng stream
  assert m.report(1, 4, 128) == {"mqar/acc/length/128": 0.25} and m.report(1, 4, 64) == {"mqar/acc": 0.25}
  with pytest.raises(ValueError, match="no length 96"):
    m.example("test", 0, 96)
  assert Mqar(MqarConfig(vocab_size=64, seq_len=32, eval_lengths=(128,))).example("test", 0, 128)["tokens"].max() < 64
  with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
    Mqar(MqarConfig(seq_len=64, num_kv_pairs=4, eval_lengths=(8,)))


def test_passkey_eval_lengths_are_probed_not_trained_and_reported_per_length():
  task = Passkey(PasskeyConfig(lengths=(8,), depths=(0.0, 1.0), eval_lengths=(16, 32), n_eval=2))
  items = task.eval_items()
  assert items[:4] == Passkey(PasskeyConfig(lengths=(8,), depths=(0.0, 1.0), n_eval=2)).eval_items()
  assert [dict(it.group)["length"] for it in items] == [8] * 4 + [16] * 4 + [32] * 4
  assert [task.beyond(it) for it in items] == [False] * 4 + [True] * 8
  assert all(sum(task.document("train", i, 0)[0][0].count(f) for f in FILLER) == 8 for i in range(50))
  scores = [AnswerScore(0.0, task.beyond(it), 2) for it in items]
  r = task.report(items, scores)
  assert r["passkey/acc"] == 0.0 and r["passkey/acc/depth/1.0"] == 0.0  # the trained length only
  assert r["passkey/acc/length/16"] == r["passkey/acc/length/32/depth/0.0"] == 1.0


@pytest.mark.parametrize("kwargs", [dict(vocab_size=64, seq_len=64), dict(seq_len=64, num_kv_pairs=17),
                                    dict(num_kv_pairs=0)])
def test_mqar_rejects_invalid_configs(kwargs):
  with pytest.raises(ValueError, match="MQAR needs"):
    Mqar(MqarConfig(**kwargs))


def test_passkey_layout_and_report():
  task = Passkey(PasskeyConfig())
  items = task.eval_items()
  assert len(items) == 3 * 5 * 8 and items == Passkey(PasskeyConfig()).eval_items()
  by_cell = {it.group: it for it in items if it.key == 0}
  for length in (8, 16, 32):
    where = [by_cell[(("length", length), ("depth", d))].context.index("The pass key is") for d in task.cfg.depths]
    assert where == sorted(where) and where[0] < where[-1]
  sizes = [np.mean([len(it.context) for it in items if dict(it.group)["length"] == L]) for L in (8, 16, 32)]
  assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
  for it in items:
    n = it.answer[1:]
    assert re.fullmatch(r" \d{5}", it.answer)
    assert f"The pass key is {n}. Remember it. {n} is the pass key." in it.context
    assert it.context.endswith("What is the pass key? The pass key is")
    L = dict(it.group)["length"]
    assert sum(it.context.count(s) for s in FILLER) == L
  (ctx, a), (ans, b) = task.document("train", 4, 0)
  assert a and b and re.fullmatch(r" \d{5}", ans) and ans[1:] in ctx
  assert task.document("train", 4, 0) == [(ctx, a), (ans, b)]
  assert task.document("train", 4, 1) != task.document("train", 4, 0)
  train_keys = {task.document("train", i, 0)[1][0] for i in range(200)}
  assert len(train_keys) > 190
  scores = [AnswerScore(0.0, dict(it.group)["length"] == 8, 2) for it in items]
  r = task.report(items, scores)
  assert r["passkey/acc"] == pytest.approx(1 / 3) and r["passkey/acc/length/8"] == 1.0
  assert r["passkey/acc/depth/0.5"] == pytest.approx(1 / 3) and r["passkey/acc/length/16/depth/0.25"] == 0.0
  g = task.report(items, scores, [dict(it.group)["depth"] == 0.5 for it in items])
  assert {k: v for k, v in g.items() if "generated" not in k} == r and len(g) == 2 * len(r)
  assert g["passkey/generated_acc"] == g["passkey/generated_acc/length/8"] == pytest.approx(1 / 5)
  assert g["passkey/generated_acc/depth/0.5"] == 1.0 and g["passkey/generated_acc/length/16/depth/0.25"] == 0.0
  with pytest.raises(ValueError):  # one hit per item
    task.report(items, scores, [True])


def test_generated_answers_match_after_stripping_whitespace():
  assert matches(" 12345", " 12345") and matches("12345\n", " 12345") and matches(" Foo Labs ", " Foo Labs")
  assert not matches(" 1234", " 12345") and not matches(" 12345.", " 12345") and not matches(" foo labs", " Foo Labs")


def test_eval_items_are_hashable():
  it = B.Bios(B.BiosConfig(n_people=2)).eval_items()[0]
  assert isinstance(it, EvalItem) and hash(it) == hash(B.Bios(B.BiosConfig(n_people=2)).eval_items()[0])
