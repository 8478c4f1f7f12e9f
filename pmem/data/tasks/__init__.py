"""Synthetic evaluation tasks generated in code, deterministic by seed (bioS, MQAR, passkey).

A text document is a list of ``Segment`` (text, in_loss). A question is an ``EvalItem`` whose
``answer`` the evaluator scores teacher-forced into an ``AnswerScore`` and, optionally, compares
with a greedily generated answer (:func:`matches`); each task's ``report`` turns those into flat
metric names.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

Segment = tuple[str, bool]


@dataclasses.dataclass(frozen=True)
class EvalItem:
  context: str  # prompt text, ends with a non-space character
  answer: str  # starts with a single space
  group: tuple[tuple[str, Any], ...]  # hashable labels, e.g. (("attribute", "major"), ("templates", "seen"))
  key: int = 0


@dataclasses.dataclass(frozen=True)
class AnswerScore:
  nats: float  # summed cross-entropy over the answer tokens given the context
  correct: bool  # every answer token is the teacher-forced argmax
  tokens: int


def matches(generated: str, answer: str) -> bool:
  """A generated answer's string comparison: exact match after stripping surrounding whitespace."""
  return generated.strip() == answer.strip()


def accuracy(task: str, items: Sequence[EvalItem], scores: Sequence[AnswerScore],
             generated: Sequence[bool] | None, cells: Callable[[dict[str, Any]], Sequence[str]]) -> dict[str, float]:
  """Mean hit per metric ``{task}/{mode}{cell}``, over the items whose group (as a dict) ``cells``
  maps to ``cell`` (each item lies in every cell it is mapped to); modes: ``acc``, teacher-forced
  (``scores``' ``correct``), and given per-item ``generated`` hits, ``generated_acc``."""
  modes = {"acc": [s.correct for s in scores], **({"generated_acc": generated} if generated is not None else {})}
  hits = collections.defaultdict(list)
  for mode, mode_hits in modes.items():
    for item, hit in zip(items, mode_hits, strict=True):
      for cell in cells(dict(item.group)):
        hits[f"{task}/{mode}{cell}"].append(bool(hit))
  return {k: sum(v) / len(v) for k, v in hits.items()}
