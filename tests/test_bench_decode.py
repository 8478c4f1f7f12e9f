"""The decode benchmark (experiments/bench/decode.py) at its --quick size: fields, not timings."""

import argparse
import json

import pytest

from tests.conftest import ORACLE_PYTHON


@pytest.mark.slow
@pytest.mark.oracle
def test_decode_bench_quick(tmp_path):
  if not ORACLE_PYTHON.exists():
    pytest.skip(f"no oracle venv at {ORACLE_PYTHON}; `make oracle` creates it")
  from experiments.bench import decode
  out = tmp_path / "decode.json"
  decode.main(["--quick", "--out", str(out), "--oracle_python", str(ORACLE_PYTHON)])
  r = json.loads(out.read_text())
  assert r["machine"]["xla_threads"] == r["machine"]["torch_threads"] >= 1
  assert {(x["impl"], x["batch"]) for x in r["dense"]} == {(i, b) for i in ("pmem", "hf_torch") for b in (1, 8)}
  assert all(x["tokens_per_s"] > 0 and len(x["runs_tokens_per_s"]) == 2 for x in r["dense"])
  assert set(r["ratio"]) == set(r["agreement"]) == {"1", "8"} and all(v > 0 for v in r["ratio"].values())
  # the same weights and greedy decoding: at 8 tokens of the tiny model no near tie flips
  assert all(a["leading_equal"] == [8] * int(b) for b, a in r["agreement"].items())
  assert {(x["placement"], x["rows"] > 0, x["tokens_per_s"] > 0) for x in r["tables"]} == {
      ("device", True, True), ("host", True, True)}
  assert len({x["rows"] for x in r["tables"]}) == 2 and r["host_matches_device"]
  assert all(v > 0 for v in (*r["table_ratio"].values(), *r["host_over_device"].values()))


def test_decode_bench_tables_tiny():
  # the table-rows part alone (no oracle): device and host tables decode the same tokens
  from experiments.bench import decode
  records, same = decode.tables(argparse.Namespace(prompt_len=8, new_tokens=4, repeats=1, table_log2=[8, 10]))
  assert same and len(records) == 4
  assert {r["placement"] for r in records} == {"device", "host"} and len({r["rows"] for r in records}) == 2
  assert all(r["rows"] >= 1 << 8 and r["tokens_per_s"] > 0 and r["token_ms"] > 0 for r in records)
