"""Byte-level packed windows: segment ids, positions, loss mask, determinism per (seed, step, row)."""

import numpy as np
import pytest

from pmem.data.text import ByteBatches, DataConfig


@pytest.fixture(scope="module")
def source():
  return ByteBatches(DataConfig(), seq_len=64, seed=0)


def test_rows_are_windows_with_consistent_segments(source):
  b = source.rows(3, range(8))
  assert b["inputs"].shape == (8, 64) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  seg, pos = b["segment_ids"], b["positions"]
  assert (seg >= 1).all() and (np.diff(seg, axis=1) >= 0).all()
  starts = np.diff(seg, axis=1, prepend=0) != 0
  assert (pos[starts] == 0).all()
  assert (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()


def test_loss_mask_drops_targets_of_the_next_document(source):
  boundary = int(np.flatnonzero(np.diff(source.doc))[0]) + 1  # first byte of document 1
  b = source.windows([boundary - 10])
  seg, pos, mask = b["segment_ids"][0], b["positions"][0], b["loss_mask"][0]
  assert (seg[:10] == 1).all() and (seg[10:] == 2).all()
  assert pos[10] == 0 and pos[9] == 9
  assert mask[9] == 0 and mask.sum() == len(mask) - 1  # input 9 would predict document 1's first byte


def test_rows_depend_only_on_seed_step_row(source):
  a = source.rows(5, [2, 7])
  b = source.rows(5, range(8))
  np.testing.assert_array_equal(a["inputs"], b["inputs"][[2, 7]])
  c = ByteBatches(DataConfig(), seq_len=64, seed=1).rows(5, [2])
  assert not np.array_equal(a["inputs"][0], c["inputs"][0])


def test_valid_split_holds_out_whole_works():
  train = ByteBatches(DataConfig(split="train"), 64, 0)
  valid = ByteBatches(DataConfig(split="valid"), 64, 0)
  assert 0 < len(valid.tokens) < len(train.tokens) / 5
  with pytest.raises(ValueError, match="unknown split"):
    ByteBatches(DataConfig(split="test"), 64, 0)


def test_unknown_corpus_suggests():
  with pytest.raises(KeyError, match="did you mean 'shakespeare'"):
    ByteBatches(DataConfig(corpus="shakespear"), 64, 0)
