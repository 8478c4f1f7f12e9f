"""The committed notebooks are executed, and what they show comes from the committed results
(``docs/results/<paper>/results.json``): their table and verdict lines equal a fresh computation."""

import contextlib
import io
import json

import pytest

from experiments import grid
from tests.conftest import ROOT

PAPERS = ("stem", "engram", "move", "pkm")


def _text(cell: dict) -> str:
  return "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")


def _shows(paper: str, records: list[dict], table: str, names: dict) -> str:
  """Checks the executed notebook ``paper`` shows ``table`` (also docs/results/<paper>/results.md) and
  that its last cell prints the same when run again on ``records`` with ``names``; returns that text."""
  nb = json.loads((ROOT / "notebooks" / f"{paper}.ipynb").read_text())
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(c["execution_count"] and c["outputs"] for c in code), "a code cell was not executed or shows nothing"
  assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
  assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"]), "no plot"
  assert f"{len(records)} runs from docs/results/{paper}" in _text(code[0])
  tables = ["".join(o["data"]["text/markdown"]) for c in code for o in c["outputs"] if "text/markdown" in o.get("data", {})]
  assert table in tables  # the table shown is the committed results' table
  assert (ROOT / "docs" / "results" / paper / "results.md").read_text() == f"# {paper}\n\n{table}\n"
  printed, fresh = _text(code[-1]), io.StringIO()
  with contextlib.redirect_stdout(fresh):  # the verdict cell, run again on the committed results
    exec("".join(code[-1]["source"]), {**names, "records": records})
  assert printed == fresh.getvalue()
  return printed


@pytest.mark.parametrize("paper", PAPERS)
def test_committed_notebook_shows_the_committed_results(paper):
  records = grid.load(ROOT / "docs" / "results" / paper)
  seeds = {v: sum(r["variant"] == v for r in records) for v in grid.variants(records)}
  assert min(seeds.values()) >= 2, f"fewer than 2 seeds: {seeds}"
  assert "=> " in _shows(paper, records, grid.table(records), {"grid": grid})


def test_committed_recall_notebook_shows_the_committed_results():
  from experiments import recall
  records = recall.load(ROOT / "docs" / "results" / "recall")
  seeds = {}
  for r in records:
    seeds.setdefault((r["task"], r["mixer"], r["d_model"], r["kv"], r["T"]), set()).add(r["seed"])
  assert min(map(len, seeds.values())) >= 2, f"fewer than 2 seeds: {seeds}"
  assert _shows("recall", records, recall.table(records), {"recall": recall}).startswith("(a) ")


def test_committed_adapters_notebook_shows_the_committed_results():
  from experiments import adapters
  records = adapters.load(ROOT / "docs" / "results" / "adapters")
  seeds = {v: sum(r["variant"] == v for r in records) for v in grid.variants(records) if v != "pretrained"}
  assert set(seeds) == set(adapters.VARIANTS) and min(seeds.values()) >= 2, f"fewer than 2 seeds: {seeds}"
  printed = _shows("adapters", records, grid.table(records, adapters.COLUMNS), {"adapters": adapters})
  assert printed.count("=> ") == 9
