"""Passkey retrieval in the Landmark-attention format (Mohtashami & Jaggi 2023, arXiv 2305.16300).

intro / filler before / needle / filler after / question, joined by newlines as in Landmark's
``run_test.py``. ``length`` counts filler sentences (the 5-sentence garbage text, cycled) and
``depth`` is the fraction of them placed before the needle. ``eval_lengths``: filler lengths probed at
evaluation only (never trained on), reported per length (``passkey/acc/length/L``, ``.../depth/d``):
length generalization.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pmem.data.tasks import AnswerScore, EvalItem, Segment, accuracy

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {n}. Remember it. {n} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_TRAIN, _EVAL = 0, 1  # rng stream tags


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  lengths: tuple[int, ...] = (8, 16, 32)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  digits: int = 5
  n_train: int = 10000
  n_eval: int = 8
  seed: int = 0
  eval_lengths: tuple[int, ...] = ()  # filler lengths probed but not trained on (length generalization)
  weight: float = 1.0  # mixture weight (used by the caller)


def prompt(passkey: int, length: int, depth: float) -> str:
  """The prompt up to (and without) the answer " {passkey}"."""
  haystack = [FILLER[i % len(FILLER)] for i in range(length)]
  cut = round(depth * length)
  return "\n".join([INTRO, " ".join(haystack[:cut]), NEEDLE.format(n=passkey), " ".join(haystack[cut:]), QUESTION])


class Passkey:
  """Training documents over the configured (length, depth) grid and one eval item set per grid cell."""

  def __init__(self, cfg: PasskeyConfig):
    if cfg.digits < 1 or not cfg.lengths or any(n < 0 for n in cfg.eval_lengths) or not cfg.depths or not all(0 <= d <= 1 for d in cfg.depths):
      raise ValueError(f"invalid passkey config {cfg}")
    self.cfg = cfg

  def _sample(self, rng: np.random.Generator) -> int:
    return int(rng.integers(10 ** (self.cfg.digits - 1), 10 ** self.cfg.digits))

  def num_documents(self, split: str) -> int:
    if split != "train":
      raise ValueError(f"passkey has only a 'train' split, got {split!r}")
    return self.cfg.n_train

  def document(self, split: str, index: int, epoch: int) -> list[Segment]:
    """A random grid cell and passkey per (index, epoch): [(prompt, True), (" {passkey}", True)]."""
    self.num_documents(split)
    rng = np.random.default_rng([self.cfg.seed, _TRAIN, index, epoch])
    length = self.cfg.lengths[rng.integers(len(self.cfg.lengths))]
    depth = self.cfg.depths[rng.integers(len(self.cfg.depths))]
    n = self._sample(rng)
    return [(prompt(n, length, depth), True), (f" {n}", True)]

  def eval_items(self) -> list[EvalItem]:
    """``n_eval`` items per (length, depth) over ``lengths`` then ``eval_lengths``, passkeys from an rng stream
    disjoint from training."""
    items = []
    for i, length in enumerate((*self.cfg.lengths, *self.cfg.eval_lengths)):
      for j, depth in enumerate(self.cfg.depths):
        for k in range(self.cfg.n_eval):
          n = self._sample(np.random.default_rng([self.cfg.seed, _EVAL, i, j, k]))
          items.append(EvalItem(prompt(n, length, depth), f" {n}", (("length", length), ("depth", depth)), key=k))
    return items

  def report(self, items: Sequence[EvalItem], scores: Sequence[AnswerScore],
             generated: Sequence[bool] | None = None) -> dict[str, float]:
    """Exact-match accuracy overall, per length, per depth and per (length, depth): teacher-forced
    (``passkey/acc...``) and, given per-item ``generated`` hits, generated (``passkey/generated_acc...``).
    Items at ``eval_lengths`` count only in their length's cells (overall and per depth: trained lengths)."""
    def cells(g):
      own = (f"/length/{g['length']}", f"/length/{g['length']}/depth/{g['depth']}")
      return own if g["length"] not in self.cfg.lengths else ("", f"/depth/{g['depth']}", *own)
    return accuracy("passkey", items, scores, generated, cells)

  def beyond(self, item: EvalItem) -> bool:
    """Whether ``item`` is at a length not trained on (``eval_lengths``)."""
    return dict(item.group)["length"] not in self.cfg.lengths
