"""Experiment grids (experiments/grid.py), the paper launchers, the headline and the notebooks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import grid
from tests.conftest import ROOT

PAPERS = ("stem", "move", "engram", "pkm")
G = grid.Grid("t", {"dense": (), "dense_matched": (), "stem": ("fiddler:stem",)}, match={"dense_matched": ("stem",)})


def fake_run(out, variant: str, seed: int, bpb: float, bits: float, flops: int = 1000) -> None:
  """A finished run's workdir: summary.json as the Trainer writes it."""
  wd = out / variant / f"seed{seed}"
  wd.mkdir(parents=True)
  ev = {"valid/loss": bpb * 2, "valid/bpb": bpb, "bios/acc/seen": 0.5, "bios/acc/heldout": 0.25,
        "bios/knowledge_bits": bits, "bios/bits_per_param": bits / 1e4, "bios/bits_per_active_param": bits / 1e3,
        "usage/stem/0/touched": 0.5, "usage/stem/1/touched": 0.25, "usage/stem/0/kl_uniform": 1.0}
  (wd / "summary.json").write_text(json.dumps({
      "params_total": 10_000, "params_active_per_token": 1000, "flops_per_token": flops, "tokens_per_s": 100.0,
      "final_loss": 1.0, "steps": 3, "eval": ev}))


def launch(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def execute_notebook(paper: str, results) -> str:
  """Runs notebooks/<paper>.ipynb on ``results`` (PMEM_RESULTS); returns its printed text."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(ROOT / "notebooks" / f"{paper}.ipynb", as_version=4)
  os.environ["PMEM_RESULTS"] = str(results)
  try:
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
  finally:
    del os.environ["PMEM_RESULTS"]
  outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outs), "the notebook drew no figure"
  return "".join(o.get("text", "") for o in outs if o.output_type == "stream")


def test_grid_collects_skips_and_tabulates(tmp_path, monkeypatch):
  # every run already has its summary: nothing may train, results are still collected and written
  monkeypatch.setattr(grid, "run_one", lambda *a: pytest.fail("a finished run was trained again"))
  for s, (d, m, st) in enumerate([(3.0, 3.1, 2.5), (3.2, 3.3, 2.7)]):
    fake_run(tmp_path, "dense", s, d, 10.0)
    fake_run(tmp_path, "dense_matched", s, m, 12.0 + s)
    fake_run(tmp_path, "stem", s, st, 40.0 + s)
  records = grid.run(G, str(tmp_path), seeds=2, quick=True, log=lambda *_: None)
  assert [(r["variant"], r["seed"]) for r in records] == [(v, s) for v in G.variants for s in (0, 1)]
  assert json.loads((tmp_path / "results.json").read_text()) == records
  assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
  assert records[0]["usage"] == {"stem touched": 0.375, "stem kl_uniform": 1.0}
  md = (tmp_path / "results.md").read_text()
  row = next(line for line in md.splitlines() if line.startswith("| stem |"))
  std = np.std([2.5, 2.7], ddof=1)
  assert f"| 2 | {np.mean([5.0, 5.4]):.4f} ± {np.std([5.0, 5.4], ddof=1):.4f} | 2.6000 ± {std:.4f} |" in row
  assert row.endswith("| 1.000 ± 0.000 | 0.375 ± 0.000 |")  # usage averaged over layers
  # stem beats dense_matched on bpb by 0.6, far beyond 2 s.e.; 'tie' within noise
  c = grid.compare(records, "stem", "dense_matched", "eval.valid/bpb")
  # float64 means and stds of two values: approx's rel 1e-6 ≫ their few roundings
  assert c["verdict"] == "better" and c["gain"] == pytest.approx(0.6) and c["se"] == pytest.approx(std)
  assert grid.compare(records, "dense_matched", "stem", "eval.valid/bpb")["verdict"] == "worse"
  assert grid.compare(records, "dense", "dense_matched", "eval.bios/knowledge_bits", higher=True)["verdict"] == "worse"
  text = grid.claim(records, "X", [("stem", "dense_matched", "eval.valid/bpb", False),
                                   ("stem", "dense_matched", "eval.bios/knowledge_bits", True)])
  assert text.endswith("X: HELD at this scale (2 seed(s) per variant, 3 steps).")
  assert "DID NOT HOLD" in grid.claim(records, "Y", [("dense", "stem", "eval.valid/bpb", False)])
  assert "cannot be judged" in grid.claim(records, "Z", [("lave", "dense", "eval.valid/bpb", False)])
  one = [r for r in records if r["seed"] == 0]  # one seed: no error bar, so no verdict however large the gain
  assert grid.compare(one, "stem", "dense_matched", "eval.valid/bpb")["verdict"] == "one seed"
  assert grid.claim(one, "W", [("stem", "dense_matched", "eval.valid/bpb", False)]).endswith(
      "W: cannot be judged from one seed per variant (no error bar).")


def test_grid_matches_flops_and_rejects_bad_commands(tmp_path):
  from configs import cli, match
  built = grid.build_all(G, 1, quick=True)
  cmds, cfg = built["dense_matched", 0]
  target = match.flops_per_token(built["stem", 0][1])
  assert cmds[-1] == f"fiddler:match_flops(flops={target})"
  assert abs(match.flops_per_token(cfg) - target) < 0.01 * target  # integer FLOPs, matched by width: within 1%
  assert match.flops_per_token(built["dense", 0][1]) > 1.1 * target  # STEM saves FFN up-projections
  bad = grid.Grid("t", {"dense": (), "typo": ("fiddler:stme",)})
  with pytest.raises(cli.ConfigError, match="variant 'typo': unknown fiddler 'stme'"):
    grid.build_all(bad, 1, quick=True)
  with pytest.raises(cli.ConfigError, match="not an unmatched variant"):
    grid.build_all(grid.Grid("t", {"dense": ()}, match={"dense": ("stem",)}), 1, quick=True)
  r = subprocess.run([sys.executable, "-m", "experiments.stem", "--quick", "--only", "stme", "--out", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode and "unknown variant 'stme'" in r.stderr
  assert not list(tmp_path.iterdir())


def test_stem_launcher_quick_and_notebook(tmp_path):
  # one real quick run (the rest of the grid: test_paper_grid, slow), then the notebook on it
  launch("experiments.stem", "--quick", "--seeds", "1", "--only", "stem", "--out", str(tmp_path))
  (rec,) = json.loads((tmp_path / "results.json").read_text())
  assert rec["variant"] == "stem" and rec["steps"] == 3 and rec["commands"][-1] == "set:seed=0"
  assert np.isfinite(rec["eval"]["valid/bpb"]) and "bios/knowledge_bits" in rec["eval"]
  assert rec["params_total"] > rec["params_active_per_token"]  # the tables are not active parameters
  assert (tmp_path / "stem" / "seed0" / "grid.json").exists() and (tmp_path / "plot.png").exists()
  text = execute_notebook("stem", tmp_path)
  assert "1 runs from" in text and "cannot be judged" in text  # dense_matched was not run


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_paper_grid(tmp_path, paper):
  r = launch(f"experiments.{paper}", "--quick", "--seeds", "2", "--out", str(tmp_path))  # one seed: no verdicts
  records = json.loads((tmp_path / "results.json").read_text())
  names = __import__(f"experiments.{paper}", fromlist=["GRID"]).GRID.variants
  assert [x["variant"] for x in records] == [v for v in names for _ in range(2)]
  assert all(np.isfinite(x["eval"]["valid/bpb"]) for x in records)
  assert r.stdout.count("\n| ") == len(names) + 1  # the printed table
  text = execute_notebook(paper, tmp_path)
  assert "cannot be judged" not in text and text.count("=> ") >= 2


@pytest.mark.slow
def test_headline_quick(tmp_path):
  r = launch("experiments.headline", "--quick", "--out", str(tmp_path))
  records = json.loads((tmp_path / "results.json").read_text())
  assert [x["variant"] for x in records] == [v for v in ("dense", "stem", "engram") for _ in range(2)]
  flops = {x["variant"]: x["flops_per_token"] for x in records}
  assert flops["dense"] >= max(flops.values()) * 0.99  # matched to the largest memory model
  assert (tmp_path / "headline.png").exists() and "stem vs dense on eval.valid/bpb" in r.stdout


@pytest.mark.slow
def test_adapters_quick(tmp_path):
  # every stage at toy size: pretrain, HF export + import, the pretrained record, a full and a LoRA fine-tune
  from experiments import adapters
  launch("experiments.adapters", "--quick", "--seeds", "1", "--only", "full,lora_r4", "--out", str(tmp_path))
  assert (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "base" / "hf" / "model.safetensors").exists()
  records = adapters.load(tmp_path)
  assert [r["variant"] for r in records] == ["pretrained", "full", "lora_r4"]
  base, full, lora = records
  assert base["params_trainable"] == 0 and base["steps"] == 0
  assert 0 < lora["params_trainable"] < full["params_trainable"] == full["params_total"]
  for r in (full, lora):  # Adam's two moments per trained parameter, in float32, and a few scalars
    assert 8 * r["params_trainable"] <= r["optimizer_bytes"] < 8 * r["params_trainable"] + 1024
  assert all(np.isfinite(r["eval"]["valid/bpb"]) and "bios/acc/seen" in r["eval"] for r in records)
  assert any(line.startswith("lora_r4: optimizer state") for line in adapters.verdicts(records))
  launch("experiments.adapters", "--quick", "--seeds", "1", "--only", "full,lora_r4", "--out", str(tmp_path))
  assert adapters.load(tmp_path) == records  # a rerun trains nothing again


def test_adapters_launcher_refuses_unknown_variants(tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.adapters", "--quick", "--only", "lora_r5", "--out",
                      str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "unknown variant 'lora_r5'" in r.stderr and not any(tmp_path.iterdir())
