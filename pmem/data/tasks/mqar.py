"""Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927), reimplemented in numpy.

A sequence opens with ``num_kv_pairs`` key-value pairs (keys from [1, V/2), values from [V/2, V), each
without replacement); then every key is queried once at an even offset after the context, the gap
index drawn without replacement from p(i) ∝ a·i^(a-1), i = 1..(T - 2kv)/2, which favours short gaps.
Unlike Zoology, where the token after a query is filler and the value only a label, the value is
written into ``tokens`` right after its query key, so ``tokens[1:]`` are the targets of ``tokens[:-1]``
and ``mask`` marks the answers; the labels Zoology trains on are the same.

``eval_lengths``: test sequences also drawn at these lengths (the same pairs and vocabulary; the query
gaps spread over the longer sequence), reported as ``mqar/acc/length/L``: length generalization beyond
the ``seq_len`` trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_SPLITS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class MqarConfig:
  vocab_size: int = 512
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True
  n_train: int = 20000
  n_test: int = 1000
  seed: int = 0
  eval_lengths: tuple[int, ...] = ()  # test lengths besides seq_len (length generalization)
  weight: float = 1.0  # mixture weight (used by the caller)


class Mqar:
  """``example(split, index)`` -> dict(tokens=int32[T+1], mask=bool[T+1]), deterministic per (seed, split, index)."""

  def __init__(self, cfg: MqarConfig):
    v, kv = cfg.vocab_size, cfg.num_kv_pairs
    if v <= cfg.seq_len:  # Zoology's bound on the trained setting; the test lengths only need room for the queries
      raise ValueError(f"MQAR needs vocab_size > seq_len, got vocab_size={v}, seq_len={cfg.seq_len}")
    for t in (cfg.seq_len, *cfg.eval_lengths):
      if kv < 1 or 4 * kv > t:
        raise ValueError(f"MQAR needs 1 <= num_kv_pairs and 4 * num_kv_pairs <= seq_len, got {kv} pairs, seq_len={t}")
    self.cfg = cfg
    self._gaps = {t: self._gap_p(t) for t in (cfg.seq_len, *cfg.eval_lengths)}
    self.gap_p = self._gaps[cfg.seq_len]  # probability of gap index i - 1 (query key at offset 2(i - 1))

  def _gap_p(self, t: int) -> np.ndarray:
    gaps = np.arange(1, (t - 2 * self.cfg.num_kv_pairs) // 2 + 1)
    p = self.cfg.power_a * gaps ** (self.cfg.power_a - 1)
    return p / p.sum()

  def num_examples(self, split: str) -> int:
    return {"train": self.cfg.n_train, "test": self.cfg.n_test}[split]

  def example(self, split: str, index: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Example ``index`` of ``split``, ``seq_len`` long (one of ``eval_lengths``; default: ``seq_len``), from
    its own rng stream."""
    if split not in _SPLITS:
      raise ValueError(f"unknown MQAR split {split!r}; use 'train' or 'test'")
    cfg, kv, half = self.cfg, self.cfg.num_kv_pairs, self.cfg.vocab_size // 2
    t = cfg.seq_len if seq_len is None else seq_len
    if t not in self._gaps:
      raise ValueError(f"MQAR has no length {t}: seq_len={cfg.seq_len}, eval_lengths={cfg.eval_lengths}")
    rng = np.random.default_rng([cfg.seed, _SPLITS[split], index] + ([t] if t != cfg.seq_len else []))
    keys = rng.choice(half - 1, size=kv, replace=False) + 1
    values = rng.choice(cfg.vocab_size - half, size=kv, replace=False) + half
    gap_p = self._gaps[t]
    query = 2 * kv + 2 * rng.choice(len(gap_p), size=kv, replace=False, p=gap_p)
    tokens = np.zeros(t + 1, np.int32)
    tokens[0:2 * kv:2], tokens[1:2 * kv:2] = keys, values
    tokens[query], tokens[query + 1] = keys, values
    mask = np.zeros(t + 1, bool)
    mask[query + 1] = True
    if cfg.random_non_queries:
      filler = np.ones(t + 1, bool)
      filler[:2 * kv] = filler[query] = filler[query + 1] = False
      tokens[filler] = rng.integers(cfg.vocab_size, size=int(filler.sum()))
    return dict(tokens=tokens, mask=mask)

  def report(self, n_correct: int, n_total: int, seq_len: int | None = None) -> dict[str, float]:
    """Zoology's metric: accuracy over answer (masked) tokens (of the ``seq_len`` examples: ``mqar/acc/length/L``)."""
    key = "mqar/acc" if seq_len in (None, self.cfg.seq_len) else f"mqar/acc/length/{seq_len}"
    return {key: n_correct / max(n_total, 1)}
