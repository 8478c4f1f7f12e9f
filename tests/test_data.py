"""The Grain pipeline: packed windows, loss masks, determinism, global shuffle, mixture weights,
per-process rows, checkpointable iterator state, and id checks at the boundary."""

import dataclasses

import numpy as np
import pytest

from pmem.data import pipeline as pipe
from pmem.data.tasks.bios import BiosConfig
from pmem.data.tasks.mqar import MqarConfig
from pmem.data.tokenizer import TokenizerConfig


def docs(n=7, seed=0):
  """Documents of distinct lengths whose tokens encode (document, position) so windows can be checked."""
  rng = np.random.default_rng(seed)
  out = []
  for d in range(n):
    length = int(rng.integers(5, 90))
    out.append(((d * 1000 + np.arange(length)).astype(np.int32), rng.random(length) < 0.8))
  return out


def windows(**kw):
  base = dict(seq_len=16, seed=0, name="toy", pack=True)
  return pipe.Windows(lambda e: docs(), **{**base, **kw})


def test_packed_windows_have_consistent_segments_positions_and_masks():
  w = windows(shuffle=False, epochs=1)
  b = w.rows(range(len(w)))
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  np.testing.assert_array_equal(b["inputs"][1:, 0], b["targets"][:-1, -1])  # stride T: every token a target once
  seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
  assert (seg >= 1).all() and (np.diff(seg, axis=1) >= 0).all()
  doc_in, doc_out = b["inputs"] // 1000, b["targets"] // 1000
  starts = np.diff(seg, axis=1, prepend=0) != 0
  assert (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all() and (pos[starts] == 0).all()
  # the same segment <=> the same document; positions match within-document offsets after a boundary
  assert ((np.diff(seg, axis=1) != 0) == (np.diff(doc_in, axis=1) != 0)).all()
  inner = starts & (np.arange(16) > 0)
  np.testing.assert_array_equal(pos[inner], b["inputs"][inner] % 1000)
  # loss only inside a document, and only where the source marks the target
  src_mask = {(d, i): m for d, (x, ms) in enumerate(docs()) for i, m in enumerate(ms)}
  expect = (doc_in == doc_out) & np.vectorize(lambda t: src_mask[(t // 1000, t % 1000)])(b["targets"])
  np.testing.assert_array_equal(mask > 0, expect)


def test_shuffle_visits_every_window_once_per_epoch_and_depends_on_seed():
  w = windows()
  n = w._count(0)
  first = w.rows(range(n))["inputs"]
  ordered = windows(shuffle=False, epochs=1).rows(range(n))["inputs"]
  assert sorted(map(bytes, first)) != sorted(map(bytes, ordered))  # document order shuffled too
  assert len({bytes(r) for r in first}) == n
  assert not np.array_equal(w.rows([n, n + 1])["inputs"], w.rows([0, 1])["inputs"])  # epoch 2 reshuffled
  other = windows(seed=1).rows(range(4))["inputs"]
  assert not np.array_equal(other, first[:4])
  np.testing.assert_array_equal(windows().rows(range(4))["inputs"], first[:4])


def test_unpacked_rows_hold_one_padded_document():
  w = windows(pack=False, seq_len=95, shuffle=False, epochs=1)
  b = w.rows(range(3))
  for r, (x, m) in enumerate(docs()[:3]):
    n = len(x)
    np.testing.assert_array_equal(b["inputs"][r, :n - 1], x[:-1])
    assert (b["segment_ids"][r, :n] == 1).all() and (b["segment_ids"][r, n:] == 0).all()
    np.testing.assert_array_equal(b["loss_mask"][r] > 0, np.r_[m[1:], np.zeros(96 - n, bool)])
  with pytest.raises(ValueError, match="raise train.seq_len"):
    windows(pack=False, seq_len=32).rows([0])


@pytest.fixture(scope="module")
def mqar_pipeline():
  cfg = pipe.DataConfig(corpus="english", tokenizer=TokenizerConfig(kind="byte"),
                        mqar=MqarConfig(vocab_size=256, seq_len=32, num_kv_pairs=4, n_train=500, weight=1.0))
  return pipe.Pipeline(cfg, seq_len=32, batch_size=8, seed=0)


def test_rows_depend_only_on_step_and_row_and_mix_by_weight(mqar_pipeline):
  p = mqar_pipeline
  full = p.rows(5, range(8))
  part = p.rows(5, [2, 7])
  for k in pipe.FIELDS:
    np.testing.assert_array_equal(part[k], full[k][[2, 7]])
  # MQAR rows are single unpacked documents (segment 1 then padding-free: T + 1 == example length)
  is_mqar = [(p.rows(s, [r])["segment_ids"] == 1).all() and p.rows(s, [r])["loss_mask"].sum() == 4
             for s in range(20) for r in range(8)]
  assert 0.4 < np.mean(is_mqar) < 0.6


def test_iterator_state_restores_the_same_stream(mqar_pipeline):
  it = mqar_pipeline.iterator([1, 3, 5], steps=10)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(2)]
  again = mqar_pipeline.iterator([1, 3, 5], steps=10)
  again.set_state(state)
  for e in expect:
    got = next(again)
    for k in pipe.FIELDS:
      np.testing.assert_array_equal(got[k], e[k])
  np.testing.assert_array_equal(expect[0]["inputs"], mqar_pipeline.rows(3, [1, 3, 5])["inputs"])


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="no training source"):
    pipe.Pipeline(pipe.DataConfig(corpus=None), 16, 4, 0)
  with pytest.raises(ValueError, match="no training source"):
    pipe.Pipeline(pipe.DataConfig(corpus_weight=0.0), 16, 4, 0)
  with pytest.raises(ValueError, match="weights must be > 0"):
    pipe.Pipeline(pipe.DataConfig(mqar=MqarConfig(vocab_size=256, seq_len=32, weight=0.0)), 32, 4, 0)


def test_a_zero_corpus_weight_holds_the_corpus_out():
  cfg = pipe.DataConfig(corpus="shakespeare", corpus_weight=0.0, tokenizer=TokenizerConfig(kind="byte"),
                        bios=BiosConfig(n_people=5))
  p = pipe.Pipeline(cfg, 64, 4, 0)
  both = pipe.Pipeline(dataclasses.replace(cfg, corpus_weight=1.0), 64, 4, 0)
  bios_only = pipe.Pipeline(dataclasses.replace(cfg, corpus=None), 64, 4, 0)
  for step in range(3):  # training rows: the bios alone, as if there were no corpus
    for k in pipe.FIELDS:
      np.testing.assert_array_equal(p.rows(step, range(4))[k], bios_only.rows(step, range(4))[k])
  assert len(p.valid_windows()) == len(both.valid_windows()) > 0  # the held-out text is still scored


def test_corpus_token_cache_is_keyed_by_the_tokenizer(tmp_path, monkeypatch):
  monkeypatch.setenv("PMEM_CACHE", str(tmp_path))

  class Shifted:  # a stand-in tokenizer: byte value + offset
    def __init__(self, offset):
      self.offset, self.fingerprint = offset, f"shift{offset}"

    def encode_batch(self, texts):
      return [np.frombuffer(t.encode(), np.uint8).astype(np.int32) + self.offset for t in texts]

  a = pipe.CorpusDocs("shakespeare", "valid", Shifted(0))
  b = pipe.CorpusDocs("shakespeare", "valid", Shifted(1))
  again = pipe.CorpusDocs("shakespeare", "valid", Shifted(1))  # read back from the cache
  assert len(list((tmp_path / "tokens").iterdir())) == 2
  for (x, _), (y, _), (z, _) in zip(a.docs, b.docs, again.docs):
    np.testing.assert_array_equal(x + 1, y)
    np.testing.assert_array_equal(y, z)
