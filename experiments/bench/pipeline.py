"""Input-pipeline throughput alone: tokens/s of whole global batches of a config's data, built by
``Pipeline.rows`` (one thread) and by the prefetching Grain iterator the trainer uses.

  python -m experiments.bench.pipeline --config config:demo [--config set:...] [--steps 200] [--out F.json]

Compare with the train step's tokens/s in that config's summary.json (``make run`` prints it).
"""

from __future__ import annotations

import json
import time

import fiddle as fdl
from absl import app, flags

from configs import cli
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.data.pipeline import Pipeline

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("config", ["config:demo"], "config:NAME, fiddler:NAME, set:PATH=VALUE")
flags.DEFINE_integer("steps", 200, "batches to build per variant")
flags.DEFINE_string("out", None, "JSON output file")


def main(argv) -> None:
  del argv
  exp = fdl.build(cli.build_config(FLAGS.config))
  t = exp.train
  t0 = time.perf_counter()
  data = Pipeline(exp.data, t.seq_len, t.batch_size, exp.seed)
  setup = time.perf_counter() - t0
  rows, tokens = range(t.batch_size), t.batch_size * t.seq_len * FLAGS.steps
  data.rows(0, rows)  # first epoch built outside the timing
  t0 = time.perf_counter()
  for s in range(FLAGS.steps):
    data.rows(s, rows)
  direct = time.perf_counter() - t0
  it = data.iterator(rows, FLAGS.steps + 1)
  next(it)
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    next(it)
  threaded = time.perf_counter() - t0
  out = [{"variant": "setup (tokenizer, corpus tokens)", "seconds": setup},
         {"variant": "rows (1 thread)", "tokens_per_s": tokens / direct},
         {"variant": f"grain iterator ({exp.data.prefetch} threads)", "tokens_per_s": tokens / threaded}]
  for r in out:
    print(f"{r['variant']:<36} " + (f"{r['tokens_per_s']:>14,.0f} tok/s" if "tokens_per_s" in r
                                      else f"{r['seconds']:>14.2f} s"))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  app.run(main)
