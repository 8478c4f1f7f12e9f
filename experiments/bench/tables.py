"""Train-step time and peak RSS of a table-dominated model vs the rows its memory table stores.

The model (:class:`TableLM`) reads a ``[V, 64]`` MemoryTable with 4096 ids per step (16 x 256,
uniform, fresh every step, the same ids for every placement) through ``pmem.memory.lookup`` and
predicts 16 classes from the rows with one ``[64, 16]`` matmul, so the step is dominated by the
table. It runs through the real train step (``pmem.train.step.make_train_step``, AdamW tables,
clipping, donated state) with the table updated ``dense`` (optax on a dense gradient),
``row_sparse`` (touched rows only) or from the ``host`` (NumPy table + state, rows staged and
prefetched per batch, ``pmem.train.host_tables``). Each (V, placement) runs in a fresh
subprocess so ``ru_maxrss`` is that configuration's peak; the step is compiled before the state
is allocated, so ``baseline_rss_bytes`` (RSS before the state exists) plus ``state_bytes`` is
what a step without transients would need. Step time is the median of ``--steps`` after warm-up.
Subprocesses run with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536:glibc.malloc.hugetlb=1``:
a fixed mmap threshold, so XLA's per-step temporaries are unmapped when freed (glibc's dynamic
threshold otherwise rises after the first free and the heap keeps and fragments them: peak RSS
crept up ~5 MiB every few steps), and, unless ``--no-thp``, transparent huge pages for XLA's CPU
buffers (NumPy already asks for them): random rows of a multi-GiB table otherwise cost a TLB
miss each, and row-sparse steps slow down ~1.5x from 2^16 to 2^20 rows on this machine. The
state's initializer is compiled before the baseline is taken, like the step.

  python -m experiments.bench.tables --out FILE.json [--quick] [--max-log2 24] [--max-dense-log2 22]

The JSON is a list of ``{rows, placement, step_s, peak_rss_bytes, state_bytes, baseline_rss_bytes,
steps_s, thp}``; a summary of the T1 targets is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench.common import available_bytes
from pmem.core.variables import MemoryTable
from pmem.memory import lookup
from pmem.train import host_tables, optim, step as step_lib

D, B, T, CLASSES = 64, 16, 256, 16
PLACEMENTS = ("dense", "row_sparse", "host")


class TableLM(nnx.Module):
  """logits = table[ids] @ w: a memory table and nothing else worth timing."""

  def __init__(self, rows: int, *, rngs: nnx.Rngs):
    self.table = MemoryTable(jnp.zeros((rows, D)), axes=("table_rows", "embed"), index="inputs")
    self.w = nnx.Param(jax.random.normal(rngs.params(), (D, CLASSES)) / D ** 0.5)

  def __call__(self, ids, ctx):
    b, t = ids.shape
    return (lookup.gather(self.table, ids).reshape(b * t, D) @ self.w[...]).reshape(b, t, CLASSES)


def _values(x, start: int = 0) -> jax.Array:
  """Parameter values from a fused iota: no table-sized temporaries (a random initializer has them)."""
  i = jnp.arange(start, start + int(np.prod(x.shape)), dtype=jnp.int32).astype(jnp.float32)
  return (0.02 * jnp.sin(i)).reshape(x.shape)


def _batches(rows: int, n: int) -> list[dict[str, np.ndarray]]:
  out = []
  for s in range(n):
    rng = np.random.default_rng(s)
    ids = rng.integers(0, rows, (B, T), dtype=np.int32)
    out.append({"inputs": ids, "targets": rng.integers(0, CLASSES, (B, T), dtype=np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)})
  return out


def _rss_now() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def train(rows: int, placement: str, steps: int) -> tuple[dict, host_tables.HostTables | None, list[float], int]:
  """Trains TableLM ``steps`` steps: (final state, host tables or None, seconds per step, RSS
  before the state was allocated)."""
  table = optim.TableOptimConfig(update="dense" if placement == "dense" else "row_sparse")
  tx = optim.Optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0, tables=table), steps)
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(lambda: TableLM(rows, rngs=nnx.Rngs(0))), nnx.Param, ...)
  name, host = "table", None
  if placement == "host":
    tx = tx.with_host({name: rows})
  step = step_lib.make_train_step(graphdef, tx, lambda s: jnp.asarray(1e-3), 0.0)

  def init():
    params = jax.tree.map(_values, abs_params)
    if placement == "host":  # a one-row placeholder, as HostTables.placeholders makes
      params[name] = params[name].replace(jnp.zeros((1, D)))
    return {"params": params, "rest": jax.tree.map(_values, abs_rest), "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  batches = _batches(rows, steps)
  batch = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, batches[0]))
  if placement == "host":
    batch["tables"] = {name: {"rows": jax.ShapeDtypeStruct((B * T, D), jnp.float32),
                              "slots": jax.ShapeDtypeStruct((B * T,), jnp.int32)}}
  fn = jax.jit(step, donate_argnums=0).lower(jax.eval_shape(init), batch).compile()
  make_state = jax.jit(init).lower().compile()  # compiled here: compiler memory is not a step's transient
  baseline = _rss_now()  # compiled, no state yet
  if placement == "host":
    values = np.empty((rows, D), np.float32)
    chunk = 1 << 16
    for a in range(0, rows, chunk):  # chunk by chunk, the values init() gives a device table
      values[a:a + chunk] = np.asarray(_values(values[a:a + chunk], start=a * D))
    host = host_tables.HostTables(tx, {name: values}, {name: "inputs"}, B * T)
    fn = host.train_step(fn)
  state = make_state()
  jax.block_until_ready(state)
  times = []
  for b in (host.prefetch(iter(batches)) if host is not None else batches):
    t0 = time.perf_counter()
    state, metrics = fn(state, jax.device_put(b))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return state, host, times, baseline


def measure(rows: int, placement: str, steps: int, warmup: int) -> dict:
  """One configuration (run in its own process)."""
  state, host, times, baseline = train(rows, placement, steps + warmup)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  if host is not None:
    state_bytes += sum(x.nbytes for x in (host.tables["table"], *host.state["table"].values()))
  return {"rows": rows, "placement": placement, "step_s": float(np.median(times[warmup:])),
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "state_bytes": int(state_bytes),
          "baseline_rss_bytes": baseline, "steps_s": times}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out")
  ap.add_argument("--quick", action="store_true", help="V <= 2^20 (about a minute)")
  ap.add_argument("--max-log2", type=int, default=24)
  ap.add_argument("--max-dense-log2", type=int, default=22, help="dense needs ~4x the table (state + gradient)")
  ap.add_argument("--steps", type=int, default=7, help="timed steps (>= 5)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--no-thp", action="store_true",
                  help="do not ask glibc for transparent huge pages (glibc.malloc.hugetlb=1)")
  ap.add_argument("--one", nargs=2, metavar=("ROWS", "PLACEMENT"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:
    print(json.dumps(measure(int(args.one[0]), args.one[1], args.steps, args.warmup)))
    return
  if not args.out:
    ap.error("--out is required")
  top = min(args.max_log2, 20 if args.quick else 24)
  results = []
  for log2 in range(14, top + 1, 2):
    rows = 1 << log2
    for placement in PLACEMENTS:
      if placement == "dense" and log2 > args.max_dense_log2:
        print(f"skip dense 2^{log2}: above --max-dense-log2={args.max_dense_log2}", file=sys.stderr)
        continue
      need = rows * D * 4 * (4 if placement == "dense" else 3) + (1 << 30)
      if need > available_bytes():
        print(f"skip {placement} 2^{log2}: needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB "
              "available", file=sys.stderr)
        continue
      tunables = "glibc.malloc.mmap_threshold=65536" + ("" if args.no_thp else ":glibc.malloc.hugetlb=1")
      env = {**os.environ, "GLIBC_TUNABLES": tunables}
      r = subprocess.run([sys.executable, "-m", "experiments.bench.tables", "--one", str(rows), placement,
                          "--steps", str(args.steps), "--warmup", str(args.warmup)], capture_output=True, text=True,
                         env=env)
      if r.returncode:
        print(f"{placement} 2^{log2} failed ({r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
        continue
      res = {**json.loads(r.stdout.strip().splitlines()[-1]), "thp": not args.no_thp}
      results.append(res)
      over = (res["peak_rss_bytes"] - res["baseline_rss_bytes"] - res["state_bytes"]) / res["state_bytes"]
      print(f"2^{log2:<2} {placement:<10} step {1e3 * res['step_s']:8.1f} ms"
            f"  peak RSS {res['peak_rss_bytes'] / 2**20:8.0f} MiB  state {res['state_bytes'] / 2**20:7.0f} MiB"
            f"  peak - baseline - state = {100 * over:+.1f}% of state", flush=True)
      with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
  _summary(results)


def _summary(results: list[dict]) -> None:
  step = {(r["rows"], r["placement"]): r["step_s"] for r in results}
  sparse_v = max((v for v, p in step if p == "row_sparse"), default=None)
  host_v = max((v for v, p in step if p == "host"), default=None)
  base = step.get((1 << 16, "row_sparse"))
  if sparse_v and base:
    print(f"row_sparse at 2^{sparse_v.bit_length() - 1} / at 2^16: {step[sparse_v, 'row_sparse'] / base:.2f} "
          "(target <= 2)")
  if (1 << 22, "dense") in step and (1 << 22, "row_sparse") in step:
    print(f"dense / row_sparse at 2^22: {step[1 << 22, 'dense'] / step[1 << 22, 'row_sparse']:.0f}x (target >= 100)")
  if host_v and base:
    print(f"host at 2^{host_v.bit_length() - 1} / row_sparse at 2^16: {step[host_v, 'host'] / base:.2f} (target <= 3)")


if __name__ == "__main__":
  main()
