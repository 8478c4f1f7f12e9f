"""Synthetic evaluation tasks generated in code, deterministic by seed (bioS, MQAR, passkey).

A text document is a list of ``Segment`` (text, in_loss). A question is an ``EvalItem`` whose
``answer`` the evaluator scores teacher-forced into an ``AnswerScore``; each task's ``report``
turns those into flat metric names.
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


def accuracy(items: Sequence[EvalItem], scores: Sequence[AnswerScore],
             name: Callable[[dict[str, Any]], str]) -> dict[str, float]:
  """Mean ``correct`` per metric name, where ``name`` maps an item's group (as a dict) to a name."""
  hits = collections.defaultdict(list)
  for item, score in zip(items, scores, strict=True):
    hits[name(dict(item.group))].append(bool(score.correct))
  return {k: sum(v) / len(v) for k, v in hits.items()}
