"""Does the train loop keep the device busy? ``Trainer.run`` against its compiled step alone.

  python -m experiments.bench.loop [--config config:demo] [--config set:...] [--steps 40] [--out F.json]

``floor``: the compiled train step dispatched back to back on one device batch, no data and no
metric reads, one wait at the end (the device's time per step). ``loop_every<k>``: ``Trainer.run`` with ``train.log_every=k`` (Grain
batches, host id checks and transfer, a logged step's metrics read after the next step is dispatched),
its median steady time per step and the loop's median ``data_fraction`` / ``sync_fraction``. ``ratio``
= loop / floor: 1 when the loop adds nothing to the device's time. On CPU the device is the host's
cores, so the host's own work (Grain threads) competes with the step's compute instead of hiding behind it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import fiddle as fdl
import jax
import numpy as np

from configs import cli
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.train.loop import Trainer

QUIET = ("set:eval.valid_batches=0", "set:eval.every=0", "set:checkpoint.every=0", "set:train.progress=False")


def floor(cmds: list[str], steps: int) -> float:
  """Seconds per step of the compiled step alone: ``steps`` calls dispatched back to back, one wait."""
  t = Trainer(fdl.build(cli.build_config([*cmds, *QUIET])))
  batch = t.to_device(next(t.it), t.rows)
  train_state = jax.block_until_ready(t.step_fn(t.train_state, batch)[0])  # compiled and warm
  t0 = time.perf_counter()
  for _ in range(steps):
    train_state = t.step_fn(train_state, batch)[0]
  jax.block_until_ready(train_state)
  return (time.perf_counter() - t0) / steps


def loop(cmds: list[str], steps: int, every: int) -> dict:
  """The trainer's loop: median steady seconds per step and its data / sync fractions."""
  exp = fdl.build(cli.build_config([*cmds, *QUIET, f"set:train.steps={steps}", f"set:train.log_every={every}"]))
  with tempfile.TemporaryDirectory() as wd:
    summary = Trainer(exp, wd).run()
    with open(f"{wd}/metrics.jsonl") as f:
      rows = [r for r in map(json.loads, f) if "data_fraction" in r][1:]  # the first interval compiles
  tokens = exp.train.batch_size * exp.train.seq_len
  return {"step_s": tokens / summary["tokens_per_s"], "data_fraction": float(np.median([r["data_fraction"] for r in rows])),
          "sync_fraction": float(np.median([r["sync_fraction"] for r in rows])), "intervals": len(rows)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", action="append", default=None, help="config:NAME / fiddler:NAME / set:PATH=VALUE")
  ap.add_argument("--steps", type=int, default=40, help="steps per loop run (and timed floor steps)")
  ap.add_argument("--every", default="1,10", help="train.log_every values to run")
  ap.add_argument("--out", default=None, help="JSON output file")
  a = ap.parse_args()
  cmds = a.config or ["config:demo"]
  fl = [floor(cmds, a.steps // 2)]
  res = {f"loop_every{k}": loop(cmds, a.steps, int(k)) for k in a.every.split(",")}
  fl.append(floor(cmds, a.steps // 2))  # before and after the loops: machine drift shows as their spread
  out = {"config": cmds, "floor_step_s": fl, **res}
  for k, r in res.items():
    r["ratio"] = r["step_s"] / float(np.mean(fl))
  print("| run | s/step | vs floor | data_fraction | sync_fraction |\n|---|---|---|---|---|\n"
        f"| floor | {np.mean(fl):.4f} (runs {', '.join(f'{x:.4f}' for x in fl)}) | 1 | – | – |")
  for k, r in res.items():
    print(f"| {k} | {r['step_s']:.4f} | {r['ratio']:.3f} | {r['data_fraction']:.4f} | {r['sync_fraction']:.4f} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()
