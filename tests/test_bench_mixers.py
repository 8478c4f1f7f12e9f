"""The sequence-mixer benchmark (experiments/bench/mixers.py) at its --quick size: fields, not timings."""

import json

import pytest

from tests.conftest import ORACLE_PYTHON


@pytest.mark.slow
@pytest.mark.oracle
def test_mixers_bench_quick(tmp_path):
  if not ORACLE_PYTHON.exists():
    pytest.skip(f"no oracle venv at {ORACLE_PYTHON}; `make oracle` creates it")
  from experiments.bench import mixers
  out = tmp_path / "mixers.json"
  mixers.main(["--quick", "--out", str(out), "--oracle_python", str(ORACLE_PYTHON)])
  r = json.loads(out.read_text())
  assert r["machine"]["xla_threads"] == r["machine"]["torch_threads"] >= 1
  names, lengths = ["tiny", "linear_attn_tiny"], [64, 128]
  assert [(x["config"], x["T"], x["batch"]) for x in r["train"]] == [(n, t, 256 // t) for t in lengths for n in names]
  assert all(x["token_us"] > 0 and len(x["runs_step_s"]) == 2 and x["temp_bytes"] > 0 and x["argument_bytes"] > 0
             for x in r["train"])
  assert set(r["over_attention"]) == set(r["crossover"]) == {"linear_attn_tiny"}
  assert set(r["over_attention"]["linear_attn_tiny"]) == {"64", "128"}
  assert r["crossover"]["linear_attn_tiny"] in (None, *lengths)
  assert set(r["flat"]) == set(names) and all(v > 0 for v in r["flat"].values())
  (fla,) = r["fla"]  # the same computation (checked before timing), both timed
  assert fla["shape"] == {"B": 1, "H": 2, "T": 128, "K": 16, "V": 16} and fla["chunk"] == 64
  assert set(fla["max_rel_diff"]) == {"o", "S", "dq", "dk", "dv", "da", "dbeta"}
  assert max(fla["max_rel_diff"].values()) <= mixers.SAME and fla["pmem_s"] > 0 and fla["fla_s"] > 0
  assert [(x["config"], x["context"], x["new_tokens"]) for x in r["decode"]] == [
      (n, c, 8) for c in (32, 64) for n in ("gdn_tiny", "tiny")]
  assert all(x["tokens_per_s"] > 0 and x["prefill_s"] > 0 and x["state_bytes"] > 0 for x in r["decode"])
  assert r["decode_ratio"] > 0 and set(r["decode_flat"]) == {"gdn_tiny", "tiny"}
  assert r["decode_flat"]["gdn_tiny"]["state_bytes"] == 1 < r["decode_flat"]["tiny"]["state_bytes"]
