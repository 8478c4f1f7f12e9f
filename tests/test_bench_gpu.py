"""The prepared GPU run (experiments/bench/gpu.py) on CPU: its dry run's rows and statuses, and how rows
that break, run out of memory or fail a check are reported. Fields and statuses, not timings."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.bench import gpu
from tests.conftest import ROOT


def rows(report: dict, section: str) -> list[dict]:
  return report[section]["rows"]


def assert_well_formed(report: dict, sections) -> None:
  for s in sections:
    assert report[s]["status"] in ("passed", "skipped", "failed") and report[s]["wall_s"] >= 0
    for r in rows(report, s):
      assert r["status"] in ("passed", "skipped", "failed"), r
      assert r["status"] != "skipped" or r["reason"], r
      assert r["status"] != "failed" or r["error"], r


@pytest.mark.slow
def test_dry_run_through_the_wrapper(tmp_path):
  # every section and model at tiny sizes (the remat sweep included), as the device machine runs it
  out = tmp_path / "gpu.json"
  args = ["--dry-run", "--budget-s", "0", "--out", str(out)]
  p = subprocess.run(["bash", str(ROOT / "experiments/bench/gpu.sh"), *args], capture_output=True, text=True,
                     env={**os.environ, "PYTHON": sys.executable}, timeout=900)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
  r = json.loads(out.read_text())
  assert r["ok"] and r["dry_run"] and r["jax"] and r["device_kind"]
  assert_well_formed(r, ("kernels", "train", "decode"))
  assert all(r[s]["status"] == "passed" for s in ("kernels", "train", "decode"))
  assert not [x for s in ("kernels", "train", "decode") for x in rows(r, s) if x["status"] == "failed"]
  kernels = rows(r, "kernels")
  assert {x["implementation"] for x in kernels} == {"pallas_gpu", "triton"}
  assert all(x["status"] == "passed" for x in kernels if x["implementation"] == "pallas_gpu")
  train = rows(r, "train")
  assert [(x["model"], x["remat"]) for x in train] == [
      ("dense", "dots_no_batch"), ("dense", "dots"), *((m, r["train"]["remat"]) for m in ("stem", "engram", "pkm"))]
  assert all(x["status"] == "passed" and math.isfinite(x["tokens_per_s"]) and x["tokens_per_s"] > 0 for x in train)
  assert all(x["mfu"] is None and x["mfu_reason"] == "dry run: no peak for cpu" for x in train)
  assert all(x["train_flops_per_token"] == 3 * x["flops_per_token"] > 0 for x in train)
  (dec,) = rows(r, "decode")
  assert dec["status"] == "passed" and dec["tokens_per_s"] > 0 and dec["same_tokens_each_run"]


def test_dry_run_dense_train_and_decode(tmp_path):
  # the real train and decode rows of the dense model, in-process; kernels not asked for
  out = tmp_path / "gpu.json"
  args = ["--dry-run", "--sections", "decode,train", "--models", "dense", "--remat", "dots", "--out", str(out)]
  assert gpu.main(args) == 0
  r = json.loads(out.read_text())
  assert_well_formed(r, ("decode", "train"))
  assert r["kernels"] == {"status": "skipped", "reason": "not in --sections", "rows": []}
  (train,) = rows(r, "train")
  s = gpu.SIZES[True]
  assert train["status"] == "passed" and train["params"] > 0 and math.isfinite(train["loss"])
  assert train["batch"] * train["seq_len"] / train["median_step_s"] == pytest.approx(train["tokens_per_s"])
  assert len(train["step_s"]) == s["steps"] and train["mfu"] is None
  (dec,) = rows(r, "decode")
  assert dec["status"] == "passed" and dec["new_tokens"] == s["new_tokens"] and dec["prefill_tokens_per_s"] > 0


def test_failures_are_rows_and_the_exit_code(tmp_path, monkeypatch):
  # without compiling anything: rows that raise, run out of memory or fail a check; a section that raises
  def fake(s, peak, cmds):
    remat = next(c for c in cmds if c.startswith("fiddler:remat"))
    if "fiddler:stem" in cmds:
      raise ValueError("broken")
    if "fiddler:pkm(n_keys=256)" in cmds:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 GiB")
    if "fiddler:engram" in cmds:
      return {"tokens_per_s": 1.0, "loss": math.nan, "error": "loss nan after 4 steps"}
    return {"tokens_per_s": 2.0 if "'dots'" in remat else 1.0, "commands": cmds}

  def boom(rep, a):
    raise RuntimeError("decode broke")

  monkeypatch.setattr(gpu, "train_step", fake)
  monkeypatch.setitem(gpu.SECTIONS, "decode", boom)
  out = tmp_path / "gpu.json"
  assert gpu.main(["--dry-run", "--sections", "train,decode", "--out", str(out)]) == 1
  r = json.loads(out.read_text())
  assert_well_formed(r, ("train", "decode"))
  assert not r["ok"] and r["train"]["status"] == r["decode"]["status"] == "failed"
  assert r["train"]["remat"] == "dots"  # the faster dense policy
  status = {(x["model"], x["remat"]): x["status"] for x in rows(r, "train")}
  assert status == {("dense", "dots_no_batch"): "passed", ("dense", "dots"): "passed", ("stem", "dots"): "failed",
                    ("engram", "dots"): "failed", ("pkm", "dots"): "skipped"}
  pkm = rows(r, "train")[-1]
  assert pkm["reason"].startswith("out of memory: ")
  (dec,) = rows(r, "decode")
  assert dec["status"] == "failed" and "decode broke" in dec["error"]
  # a row not started within the budget is skipped, and a run of skips alone exits 0
  assert gpu.main(["--dry-run", "--sections", "train", "--models", "dense", "--budget-s", "1e-9",
                   "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["ok"] and r["train"]["status"] == "skipped" and len(rows(r, "train")) == 2
  assert all(x["status"] == "skipped" and "--budget-s" in x["reason"] for x in rows(r, "train"))
