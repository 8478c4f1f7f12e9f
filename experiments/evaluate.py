"""Evaluate a training workdir's checkpoint without training: ``python -m experiments.evaluate --workdir W
[--step N]`` (default: the newest readable checkpoint).

Rebuilds the run from ``W/config.json``, restores the checkpoint (checking its fingerprint), runs the
run's evaluation and writes ``W/eval_step<N>.json``; nothing else in the workdir changes."""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from pmem.core.runtime import reexec_with_tuned_malloc

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir (holds config.json and checkpoints/)")
flags.DEFINE_integer("step", None, "the checkpoint to evaluate (default: the newest readable one)")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required")
  path, ckpts = os.path.join(FLAGS.workdir, "config.json"), os.path.join(FLAGS.workdir, "checkpoints")
  if not os.path.exists(path):
    sys.exit(f"error: {FLAGS.workdir} has no config.json; is it a training workdir?")
  if not any(n.isdigit() for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])):
    sys.exit(f"error: {FLAGS.workdir} has no checkpoint to evaluate")

  import fiddle as fdl
  from fiddle.experimental import serialization
  from pmem.train.loop import Trainer

  with open(path) as f:
    cfg = serialization.load_json(f.read())
  try:
    trainer = Trainer(fdl.build(cfg), FLAGS.workdir, step=FLAGS.step)
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"error: {e.args[0] if e.args else e}")
  if trainer.start_step == 0:
    sys.exit(f"error: {FLAGS.workdir} has no readable checkpoint to evaluate (unreadable ones were set aside)")
  results = {"step": trainer.start_step, **trainer.evaluate()}
  out = os.path.join(FLAGS.workdir, f"eval_step{trainer.start_step}.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print("pmem: " + json.dumps({k: v for k, v in results.items() if k == "step" or k.count("/") == 1}))
  print(f"pmem: wrote {out}")


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  app.run(main)
