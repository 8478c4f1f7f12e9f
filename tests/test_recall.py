"""experiments.recall at a tiny size (--quick: one MQAR setting and passkey, 3 steps each): the rows it
writes, its table and verdict lines; decode-state bytes of a recurrent vs an attention config."""

import csv
import json
import math

from experiments import recall
from tests.test_experiments import launch


def test_recall_quick(tmp_path):
  r = launch("experiments.recall", "--quick", "--seeds", "1", "--only", "attention", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [(x["task"], x["mixer"], x["config"], x["seed"]) for x in rows] == [("mqar", "attention", "tiny", 0),
                                                                           ("passkey", "attention", "tiny", 0)]
  mq, pk = rows
  assert (mq["d_model"], mq["kv"], mq["T"], mq["steps"]) == (*recall.QUICK_SETTINGS[0], 3)
  assert (pk["kv"], pk["acc_far"] is not None) == (None, True)
  for x in rows:
    grown = [f"acc_{g}x" for g in recall.GROW]  # evaluated beyond the trained length too
    assert all(isinstance(x[k], float) and 0 <= x[k] <= 1 for k in ("acc", *grown))
    assert x["acc_far"] is None or 0 <= x["acc_far"] <= 1
    assert isinstance(x["wall_s"], float) and math.isfinite(x["wall_s"])
    summary = json.loads((tmp_path / x["task"] / x["variant"] / "seed0" / "summary.json").read_text())
    assert x["state_bytes"] == summary["decode_state_bytes_per_sequence"] > 0
    assert x[f"state_bytes_{recall.LONG}"] > x["state_bytes"]  # attention's KV cache grows with the context
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(t["task"], t["mixer"], t["T"]) for t in table] == [(x["task"], x["mixer"], str(x["T"])) for x in rows]
  md = (tmp_path / "results.md").read_text()
  assert md == f"# recall\n\n{recall.table(rows)}\n" and "| attention | tiny |" in md and "Length generalization" in md
  assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
  assert [line[:4] for line in r.stdout.splitlines() if line.startswith("(")] == ["(a) ", "(b) ", "(c) "]


def test_recurrent_state_does_not_grow():
  gdn = ["config:tiny", *recall.MIXERS["gdn"][1]]
  assert recall.long_state_bytes(gdn, 64) == recall.long_state_bytes(gdn, recall.LONG)
  assert recall.long_state_bytes(["config:tiny"], recall.LONG) > 100 * recall.long_state_bytes(gdn, recall.LONG)


def test_verdicts_on_constructed_results():
  acc = {"attention": (0.95, 0.97), "linear_attn": (0.40, 0.42), "gdn": (0.60, 0.62), "hybrid": (0.90, 0.92)}
  rows = lambda acc: [{"task": "mqar", "mixer": m, "d_model": 64, "kv": 2, "T": 16, "seed": s, "acc": a,  # noqa: E731
                       "state_bytes": 100 if m == "attention" else 50, f"state_bytes_{recall.LONG}": 1000}
                      for m, xs in acc.items() for s, a in enumerate(xs)]
  a, b, c = recall.verdicts(rows(acc))
  assert "solves MQAR (accuracy >= 0.9) at every d64 setting: holds" in a
  assert "gdn beats linear attention (MQAR accuracy, mean over 1 settings): holds" in b
  assert ": holds — " in c and "closes 86% of it" in c  # (0.91 - 0.61) / (0.96 - 0.61)
  acc["gdn"] = (0.98, 0.99)  # gdn above attention: no gap for the hybrid to close
  assert "not applicable" in recall.verdicts(rows(acc))[2]
