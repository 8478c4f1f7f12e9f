"""Inspection of memory modules during evaluation (issue M1/M2 diagnostics).

- **Row usage** per table and layer, from the ids modules report through
  :func:`pmem.memory.diagnostics.usage` while the score step runs under ``collect()``: the fraction
  of rows touched over the evaluation set and per batch, and the KL divergence (nats) of the usage
  distribution from uniform (PKM's key-usage metrics, Lample 2019 §4.4), plus a histogram of
  per-row hit counts (bins ``0, 1, 2-3, 4-7, ...``).
- **Statistics** of reported values (:func:`pmem.memory.diagnostics.stat`, e.g. Engram's gate):
  mean, std, 10th/50th/90th percentiles over real (non-padding) positions.
- **Angular spread** of each table's rows (STEM §5: spread-out rows make edits local): mean and
  90th percentile of |cos| between distinct rows of a fixed sample of rows.

Metric names: ``usage/<name>/<layer>/{touched, touched_per_batch, kl_uniform}``,
``stats/<name>/<layer>/{mean, std, p10, p50, p90}``, ``tables/<path>/{abs_cos_mean, abs_cos_p90}``
(``<layer>`` counts the reporting calls of one forward in order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

SPREAD_ROWS = 512  # rows sampled per table for the |cos| statistics


def _mask(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Values at real positions when the value's leading dims are the batch's ``[B, T]``."""
  if values.shape[:2] == valid.shape:
    return values[valid]
  return values.reshape(-1)


class UsageAccumulator:
  """Sums row hits and reported values over evaluation batches."""

  def __init__(self):
    self.counts: dict[tuple[str, int], np.ndarray] = {}
    self.per_batch: dict[tuple[str, int], list[float]] = {}
    self.values: dict[tuple[str, int], list[np.ndarray]] = {}

  def add(self, out: Mapping, valid: np.ndarray) -> None:
    """``out``: a score step's ``usage`` ({name: [(ids, rows), ...]}) and ``stats`` ({name: [values]});
    ``valid``: bool ``[B, T]``, real positions."""
    for name, reads in out.get("usage", {}).items():
      for i, (ids, rows) in enumerate(reads):
        hits = np.bincount(_mask(np.asarray(ids), valid).reshape(-1).astype(np.int64), minlength=int(rows))
        key = (name, i)
        self.counts[key] = self.counts.get(key, 0) + hits
        self.per_batch.setdefault(key, []).append(float((hits > 0).mean()))
    for name, values in out.get("stats", {}).items():
      for i, v in enumerate(values):
        self.values.setdefault((name, i), []).append(_mask(np.asarray(v, np.float64), valid).reshape(-1))

  def report(self) -> tuple[dict[str, float], dict[str, list[int]]]:
    """(scalar metrics, histograms of per-row hit counts)."""
    out, hist = {}, {}
    for (name, i), c in self.counts.items():
      p = c / max(c.sum(), 1)
      nz = p[p > 0]
      out[f"usage/{name}/{i}/touched"] = float((c > 0).mean())
      out[f"usage/{name}/{i}/touched_per_batch"] = float(np.mean(self.per_batch[(name, i)]))
      out[f"usage/{name}/{i}/kl_uniform"] = float(math.log(len(c)) + (nz * np.log(nz)).sum())
      bins = np.where(c > 0, np.floor(np.log2(np.maximum(c, 1))).astype(np.int64) + 1, 0)
      hist[f"usage/{name}/{i}"] = np.bincount(bins).tolist()
    for (name, i), vs in self.values.items():
      v = np.concatenate(vs)
      q = np.percentile(v, [10, 50, 90]) if v.size else [math.nan] * 3
      out.update({f"stats/{name}/{i}/mean": float(v.mean()), f"stats/{name}/{i}/std": float(v.std()),
                  f"stats/{name}/{i}/p10": float(q[0]), f"stats/{name}/{i}/p50": float(q[1]),
                  f"stats/{name}/{i}/p90": float(q[2])})
    return out, hist


def angular_spread(tables: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, float]:
  """|cos| between distinct rows of a fixed sample of each table (per stacked layer, averaged)."""
  out = {}
  for path, t in tables.items():
    t = np.asarray(t, np.float32)
    t = t.reshape(-1, *t.shape[-2:])
    rows = np.random.default_rng(seed).choice(t.shape[1], min(SPREAD_ROWS, t.shape[1]), replace=False)
    means, p90s = [], []
    for layer in t:
      x = layer[np.sort(rows)].astype(np.float64)
      x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
      c = np.abs(x @ x.T)[~np.eye(len(x), dtype=bool)]
      means.append(c.mean())
      p90s.append(np.percentile(c, 90))
    out[f"tables/{path}/abs_cos_mean"] = float(np.mean(means))
    out[f"tables/{path}/abs_cos_p90"] = float(np.mean(p90s))
  return out
