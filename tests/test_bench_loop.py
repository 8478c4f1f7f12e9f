"""experiments.bench.loop: the loop and floor measurements run and report what they claim to."""

import math

from experiments.bench import loop


def test_loop_bench_reports_steps_and_fractions():
  cmds = ["config:tiny", "set:train.batch_size=4", "set:train.seq_len=32"]
  assert loop.floor(cmds, 3) > 0
  r = loop.loop(cmds, 6, 2)
  assert r["intervals"] == 2 and r["step_s"] > 0  # 3 logged intervals, the compiling first one dropped
  assert all(0 <= r[k] <= 1 and math.isfinite(r[k]) for k in ("data_fraction", "sync_fraction"))
