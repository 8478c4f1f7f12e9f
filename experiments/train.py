"""Launcher: ``python -m experiments.train --config config:NAME [--config fiddler:NAME]
[--config set:PATH=VALUE] --workdir DIR`` (``--list`` prints configs and fiddlers). Without a
leading ``config:`` the workdir's own ``config.json`` is the base (``config:DIR``): an imported
model's (``experiments.convert``) to fine-tune, or a run's to resume or extend."""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags, logging

from pmem.core.runtime import reexec_with_tuned_malloc

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("config", [], "config:NAME, fiddler:NAME[(k=v)], set:PATH=VALUE; applied in order")
flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_bool("list", False, "print every registered config and fiddler and exit")
flags.DEFINE_bool("overwrite", False, "start over in a workdir that holds a run's logs but no checkpoint")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run")
flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")
flags.DEFINE_bool("distributed_auto", False, "let JAX detect the cluster (TPU pod, SLURM, ...)")


def write_config(cfg, workdir: str) -> None:
  from fiddle import printing

  from configs import cli
  from fiddle.experimental import serialization
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.txt"), "w") as f:  # the classes built, then every value
    f.write("".join(f"# {line}\n" for line in cli.built(cfg)) + printing.as_str_flattened(cfg) + "\n")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(serialization.dump_json(cfg, indent=2))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from configs import cli
  if FLAGS.list:
    print(cli.listing())
    return
  commands = list(FLAGS.config)
  if (FLAGS.workdir and not (commands and commands[0].startswith("config:"))
      and os.path.isfile(os.path.join(FLAGS.workdir, "config.json"))):
    commands.insert(0, f"config:{FLAGS.workdir}")
  try:
    cfg = cli.build_config(commands)
  except (ValueError, KeyError) as e:  # cli.ConfigError, and what fiddlers refuse
    sys.exit(f"error: {e.args[0] if e.args else e}")
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required")

  import fiddle as fdl
  import jax
  from pmem.core import mesh as mesh_lib
  from pmem.train.checkpoint import CheckpointError
  from pmem.train.loop import Trainer

  mesh_lib.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  auto=FLAGS.distributed_auto)
  trainer = None
  try:
    try:  # a workdir in use by another run is refused here (Trainer's lock), before anything is written
      trainer = Trainer(fdl.build(cfg), FLAGS.workdir, overwrite=FLAGS.overwrite, lock=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
      sys.exit(f"error: {e.args[0] if e.args else e}")
    if jax.process_index() == 0 and trainer.finished() is None:
      write_config(cfg, FLAGS.workdir)
    trainer.run()
  except (CheckpointError, FloatingPointError) as e:  # a failed save, the NaN stop: one line, exit 1
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # Ctrl-C: run() has let its saves finish; one line (process 0's), exit 130
    command = shlex.join(sys.orig_argv)
    if jax.process_index() == 0:
      print(trainer.interrupted(command) if trainer else f"pmem: interrupted before training; rerun: {command}",
            file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  app.run(main)
