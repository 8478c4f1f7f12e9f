"""Train-step throughput of each memory module's tiny model vs the dense baseline at matched FLOPs.

For every module config (``stem_tiny``, ``move_tiny``, ``lave_tiny``, ``engram_tiny``, ``pkm_tiny``,
``memory_plus_tiny``; absent ones are skipped with a note) the dense ``tiny`` model is rescaled to
the module model's forward FLOPs per token (``fiddler:match_flops``) and both run the real jitted,
donated train step (tables updated as ``train.optim.tables.update=auto`` picks: dense below
``sparse_min_rows``) (:class:`pmem.train.loop.Trainer`) on pipeline batches already on the device.
After warm-up every model steps once per round, in turn, so machine noise hits them alike;
medians over rounds are reported with the ratio module / matched dense tokens/s.

A second table times the Engram model (row-sparse table updates) as its hashed tables grow from
2^12 to 2^20 rows per head table (same data, same rows touched): step time must not grow with rows.

  python -m experiments.bench.modules --out FILE.json [--quick] [--rounds 15] [--only pkm_tiny,memory_plus_tiny]
JSON: a list of ``{name, kind: "module" | "table_rows", rows, step_s, tokens_per_s, ratio,
flops_per_token, params}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import fiddle as fdl
import jax
import numpy as np

import configs
from configs import cli
from configs.match import flops_per_token
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.train.loop import Trainer

MODULES = (("stem_tiny", "stem"), ("move_tiny", "move"), ("lave_tiny", "lave"), ("engram_tiny", "engram"),
           ("pkm_tiny", "pkm"), ("memory_plus_tiny", "memory_plus"))
COMMON = ["set:train.steps=1000", "set:eval.valid_batches=0"]
ROW_SPARSE = "set:train.optim.tables.update=row_sparse"


class Runner:
  """One model's Trainer, stepping on a few prefetched device batches."""

  def __init__(self, commands: list[str], n_batches: int = 4):
    cfg = cli.build_config(commands + COMMON)
    self.flops, self.trainer = flops_per_token(cfg), Trainer(fdl.build(cfg))
    t = self.trainer
    with jax.set_mesh(t.mesh):
      self.batches = [t.to_device(next(t.it), t.rows) for _ in range(n_batches)]
    self.tokens = t.exp.train.batch_size * t.exp.train.seq_len
    self.times: list[float] = []
    self.i = 0

  def step(self, record: bool = True) -> None:
    t = self.trainer
    with jax.set_mesh(t.mesh):
      t0 = time.perf_counter()
      t.train_state, metrics = t.step_fn(t.train_state, self.batches[self.i % len(self.batches)])
      jax.block_until_ready((t.train_state, metrics))
    self.i += 1
    if record:
      self.times.append(time.perf_counter() - t0)

  def record(self, name: str, kind: str, rows: int | None = None) -> dict:
    s = float(np.median(self.times))
    return {"name": name, "kind": kind, "rows": rows, "step_s": s, "tokens_per_s": self.tokens / s,
            "flops_per_token": self.flops, "params": self.trainer.params_total}


def race(runners: dict[str, Runner], rounds: int, warmup: int = 3) -> None:
  for r in range(warmup + rounds):
    for run in runners.values():
      run.step(record=r >= warmup)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="STEM only, 2 table sizes, 3 rounds (tests)")
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--only", help="comma-separated module configs (default: all; the Engram rows table runs "
                                 "when engram_tiny is among them)")
  a = ap.parse_args()
  only = set(a.only.split(",")) if a.only else {c for c, _ in MODULES}
  if unknown := only - {c for c, _ in MODULES}:
    ap.error(f"--only: unknown module configs {sorted(unknown)}; choose from {[c for c, _ in MODULES]}")
  configs.load_all()
  rounds = 3 if a.quick else a.rounds
  mods = [(c, f) for c, f in MODULES if c in configs.CONFIGS and c in only][:1 if a.quick else None]
  for c, _ in MODULES:
    if c not in configs.CONFIGS:
      print(f"skip {c}: no such config", flush=True)
  runners = {}
  for c, f in mods:
    runners[c] = Runner([f"config:{c}"])
    runners[f"dense@{c}"] = Runner(["config:tiny", f"fiddler:match_flops(like={f!r})"])
  race(runners, rounds)
  results = []
  print(f"load average {open('/proc/loadavg').read().split()[:3]}")
  print("| model | step ms | tokens/s | FLOPs/token | params | / matched dense |\n|---|---|---|---|---|---|")
  for c, _ in mods:
    m, d = runners[c].record(c, "module"), runners[f"dense@{c}"].record(f"dense@{c}", "module")
    m["ratio"], d["ratio"] = m["tokens_per_s"] / d["tokens_per_s"], 1.0
    results += [d, m]
    for r in (d, m):
      print(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['flops_per_token']:,} | "
            f"{r['params']:,} | {r['ratio']:.3f} |")
  if "engram_tiny" in configs.CONFIGS and "engram_tiny" in only:
    sizes = [1 << 12, 1 << 16] if a.quick else [1 << k for k in range(12, 21, 2)]
    scaled = {n: Runner(["config:tiny", f"fiddler:engram(layers=(1,), heads=4, table_size={n})", ROW_SPARSE])
              for n in sizes}
    race(scaled, rounds)
    base = scaled[sizes[0]].record("", "table_rows")["step_s"]
    print("\nEngram (row-sparse tables) step time vs rows per head table\n| rows | step ms | / smallest |\n|---|---|---|")
    for n, run in scaled.items():
      r = run.record(f"engram_tiny@{n}", "table_rows", rows=n)
      r["ratio"] = r["step_s"] / base
      results.append(r)
      print(f"| {n:,} | {1e3 * r['step_s']:.1f} | {r['ratio']:.2f} |")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()
