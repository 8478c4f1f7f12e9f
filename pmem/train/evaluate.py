"""Evaluation: held-out text (loss, perplexity, bits per byte) and the generated tasks' probes.

Everything reduces the per-position ``nll`` / ``correct`` of :func:`pmem.train.step.make_score_step`:
text metrics over loss masks, task probes over answer spans (a probe row is context + answer,
only the answer tokens in the mask; an answer is *correct* when every token is the argmax, which is
what greedy decoding would reproduce). With ``eval.generate`` the bios and passkey probes are also
answered by greedy generation from the context, through the trainer's ``generate``
(``*/generated_acc``, :meth:`Evaluator.generated`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from pmem.data import pipeline as pipe
from pmem.data.tasks import AnswerScore, EvalItem, matches
from pmem.data.tokenizer import Tokenizer
from pmem.train.inspect import UsageAccumulator

Score = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # global [B, T] batch -> nll, correct
Generate = Callable[[list[np.ndarray], int], list[np.ndarray]]  # prompts, max_new_tokens -> greedy new tokens


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 0  # steps between evaluations during training; 0 = only after the last step
  valid_batches: int | None = 8  # batches of held-out text; None = the whole valid split, 0 = none
  bios_people: int | None = 1000  # people probed per template set; None = all
  mqar_examples: int | None = None  # test examples; None = mqar.n_test
  generate: bool = False  # also answer the bios and passkey probes by greedy generation (*/generated_acc)


def greedy_answers(generate: Generate, tok: Tokenizer, items: Sequence[EvalItem]) -> list[str]:
  """Each probe's greedily generated answer: the first ``k`` new tokens after its context, decoded,
  ``k`` its answer's token count (all are generated for the longest answer's count; the tokens past
  ``k`` change none before them)."""
  contexts = [np.asarray(x, np.int32) for x in tok.encode_batch([it.context for it in items])]
  k = [len(x) for x in tok.encode_batch([it.answer for it in items])]
  return [tok.decode(x[:n]) for x, n in zip(generate(contexts, max(k)), k, strict=True)]


class Evaluator:

  def __init__(self, cfg: EvalConfig, data: pipe.Pipeline, score: Score, generate: Generate | None = None):
    if cfg.generate and generate is None:
      raise ValueError("eval.generate needs a generate function")
    self.cfg, self.data, self.score, self.generate = cfg, data, score, generate
    self._valid = None
    self.usage: UsageAccumulator | None = None  # set while held-out text is scored
    self.histograms: dict[str, list[int]] = {}  # of the last evaluation (pmem.train.inspect)

  def _batches(self, fields: dict[str, np.ndarray]):
    """Score rows in batches of the train batch size, padding the last with masked-out rows."""
    n, b = len(fields["inputs"]), self.data.b
    for lo in range(0, n, b):
      part = {k: v[lo:lo + b] for k, v in fields.items()}
      m = len(part["inputs"])
      if m < b:
        part = {k: np.concatenate([v, np.zeros((b - m, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
      out = self.score(part)
      diag = {k: out.pop(k) for k in ("usage", "stats") if k in out}
      if diag and self.usage is not None:  # padded rows have segment id 0: not counted
        self.usage.add(diag, part["segment_ids"] > 0)
      yield part, {k: v[:m] for k, v in out.items()}, m

  def text(self) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte on the corpus's held-out documents."""
    if self._valid is None:
      self._valid = self.data.valid_windows()
    w, b = self._valid, self.data.b
    n = len(w) if self.cfg.valid_batches is None else min(len(w), self.cfg.valid_batches * b)
    nll = tokens = nbytes = 0.0
    width = self.data.tokenizer.token_bytes
    self.usage = UsageAccumulator()
    try:
      for lo in range(0, n, b):
        fields = w.rows(range(lo, min(lo + b, n)))
        for part, out, m in self._batches(fields):
          mask = part["loss_mask"][:m] > 0
          nll += float(out["nll"][mask].sum())
          tokens += float(mask.sum())
          nbytes += float(width[part["targets"][:m][mask]].sum())
      usage, self.histograms = self.usage.report()
    finally:
      self.usage = None
    loss = nll / max(tokens, 1.0)
    return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 700.0)),
            "valid/bpb": nll / math.log(2) / max(nbytes, 1.0), "valid/tokens": tokens, **usage}

  def answers(self, items: Sequence[EvalItem], fit: bool = False) -> list[AnswerScore]:
    """Teacher-forced answer scores of context -> answer probes (``fit``: :meth:`_spans`)."""
    docs = pipe.encode_segments(self.data.tokenizer, [[(it.context, False), (it.answer, True)] for it in items])
    return [AnswerScore(nats=float(nll.sum()), correct=bool(hit.all()), tokens=len(hit))
            for nll, hit in self._spans(docs, f"{len(items)} probes", fit)]

  def generated(self, items: Sequence[EvalItem]) -> list[bool]:
    """Whether each probe's greedy answer (:func:`greedy_answers`) matches its answer as a string
    (:func:`pmem.data.tasks.matches`). Greedy decoding follows the argmax chain, so a teacher-forced
    ``correct`` answer is a generated match (up to rounding: cached decode steps vs one forward pass)."""
    answers = greedy_answers(self.generate, self.data.tokenizer, items)
    return [matches(text, it.answer) for text, it in zip(answers, items, strict=True)]

  def _probes(self, task, items: Sequence[EvalItem]) -> dict[str, float]:
    """``task``'s report of teacher-forced (and with ``eval.generate``, generated) answers."""
    return task.report(items, self.answers(items), self.generated(items) if self.cfg.generate else None)

  def _spans(self, docs: Sequence[pipe.Doc], name: str, fit: bool = False):
    """(nll, correct) over each document's masked targets, one document per row of ``train.seq_len + 1``
    tokens (``fit``: as long as the longest document, if longer: probes beyond the length trained on)."""
    t1 = max(self.data.t + 1, *(len(x) for x, _ in docs)) if fit else self.data.t + 1
    fields = pipe.window_fields(*pipe.pad_rows(docs, t1, name))
    for part, out, m in self._batches(fields):
      for i in range(m):
        sel = part["loss_mask"][i] > 0
        yield out["nll"][i][sel], out["correct"][i][sel]

  def run(self) -> dict[str, float]:
    out: dict[str, float] = {}
    if self.data.cfg.corpus is not None and self.cfg.valid_batches != 0:
      out.update(self.text())
    tasks = self.data.tasks
    if "bios" in tasks:
      items = [it for t in ("seen", "heldout") for it in tasks["bios"].eval_items(t, self.cfg.bios_people)]
      out.update(self._probes(tasks["bios"], items))
    if "passkey" in tasks:
      pk = tasks["passkey"]
      items = pk.eval_items()
      out.update(self._probes(pk, [it for it in items if not pk.beyond(it)]))
      if far := [it for it in items if pk.beyond(it)]:  # teacher-forced only (a generator's cache: seq_len)
        out.update(pk.report(far, self.answers(far, fit=True)))
    if "mqar" in tasks:
      m = tasks["mqar"]
      n = m.cfg.n_test if self.cfg.mqar_examples is None else self.cfg.mqar_examples
      for t in (m.cfg.seq_len, *m.cfg.eval_lengths):
        ex = [m.example("test", i, t) for i in range(n)]
        hits = [hit for _, hit in self._spans([(x["tokens"], x["mask"]) for x in ex], "mqar", t != m.cfg.seq_len)]
        out.update(m.report(int(sum(h.sum() for h in hits)), int(sum(len(h) for h in hits)), t))
    return out
